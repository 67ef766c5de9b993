"""The one retry delay: exponential backoff with full jitter.

``delay = uniform(0, min(hi, lo * 2**n))`` for the n-th consecutive failure (AWS's "full
jitter": retries of a fleet that lost its link at the same moment spread out instead of
arriving together).  Used by the MQTT reconnect loop, the sync worker and the store's
retry of a refused commit.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """``next()`` gives the delay before the next try; ``reset()`` after a success.

    ``jitter=False`` gives the cap itself (a deterministic doubling), for loops whose
    retries are local (a full disk) rather than fleet-wide."""

    __slots__ = ("lo", "hi", "n", "_uniform")

    def __init__(
        self,
        lo: float,
        hi: float,
        *,
        jitter: bool = True,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if lo <= 0:
            raise ValueError("the first backoff must be positive")
        self.lo, self.hi, self.n = lo, max(lo, hi), 0
        self._uniform = uniform if jitter else (lambda _a, b: b)

    def cap(self) -> float:
        """The largest delay the next try may get."""
        return min(self.hi, self.lo * (2**self.n))

    def next(self) -> float:
        cap = self.cap()
        self.n = min(self.n + 1, 62)
        return self._uniform(0, cap)

    def reset(self) -> None:
        self.n = 0
