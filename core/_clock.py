"""The one clock helper: wall time in milliseconds, the UTC day, and an injectable clock.

Code that decides something from time (a circuit breaker's cooldown, a backoff, a byte
budget's day) takes a :class:`Clock` instead of calling :mod:`time` itself, so a test
moves time forward with :class:`ManualClock` rather than waiting it out.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock", "SystemClock", "now_ms", "utc_day"]


def now_ms() -> int:
    """Milliseconds since the Unix epoch (wall time)."""
    return time.time_ns() // 1_000_000


def utc_day(ms: int | None = None) -> str:
    """``YYYY-MM-DD`` of a wall time in milliseconds (now when omitted), in UTC."""
    s = time.time() if ms is None else ms / 1000
    return time.strftime("%Y-%m-%d", time.gmtime(s))


@runtime_checkable
class Clock(Protocol):
    """Where a component reads time: ``time()`` is wall seconds, ``monotonic()`` never
    goes back (use it for durations and deadlines)."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock."""

    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock that only moves when told to (tests): ``clock.advance(30)``."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall = start
        self._mono = 0.0

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._wall += seconds
        self._mono += seconds
