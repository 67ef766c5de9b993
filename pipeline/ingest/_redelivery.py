"""The redelivery window: after every (re)connect, for ``broker.redelivery_window_s``
seconds, every message is checked against the stored identities, DUP flag or not
(docs/ingest.md, "Redeliveries").

The window reads time from an injected :class:`core._clock.Clock` (its monotonic side), so
a test moves it with :class:`core._clock.ManualClock`.  Its state is served as the gauge
``edgepipe_redelivery_window_open`` (1 while open): a process closes the window with a
timer on the event loop when the time is up, so the gauge falls to 0 without a message
having to arrive, and never reads 0 while a message could still be taken for a possible
redelivery.
"""

from __future__ import annotations

import asyncio

from core._clock import SYSTEM_CLOCK, Clock
from core._metrics import METRICS

__all__ = ["RedeliveryWindow"]

_open_gauge = METRICS.gauge(
    "edgepipe_redelivery_window_open",
    "1 while the redelivery window after a connect is open (every message is checked "
    "against the store), else 0",
)
_open_gauge.set(0)

#: Longest wait of the closing timer: with a clock that is not the loop's own (a test's
#: ManualClock) the timer re-checks at least this often.
_RECHECK_MAX_S = 1.0


class RedeliveryWindow:
    """``open()`` at every connect; ``is_open()`` (cheap: once per socket read) tells
    whether what arrives now may have been delivered before."""

    __slots__ = ("duration_s", "_clock", "_until", "_timer")

    def __init__(self, duration_s: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self.duration_s = duration_s
        self._clock = clock
        self._until = 0.0  # 0: closed
        self._timer: asyncio.TimerHandle | None = None

    def open(self, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """Start a window of ``duration_s`` from now (replacing any open one); with ``loop``
        a timer closes it when the time is up.  Returns whether it is open."""
        self._cancel_timer()
        if self.duration_s <= 0:
            self.close()
            return False
        self._until = self._clock.monotonic() + self.duration_s
        _open_gauge.set(1)
        if loop is not None:
            self._schedule(loop)
        return True

    def is_open(self) -> bool:
        until = self._until
        if until == 0.0:
            return False
        if self._clock.monotonic() < until:
            return True
        self.close()
        return False

    def close(self) -> None:
        self._cancel_timer()
        self._until = 0.0
        _open_gauge.set(0)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        left = self._until - self._clock.monotonic()
        self._timer = loop.call_later(min(max(left, 0.0), _RECHECK_MAX_S), self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self.is_open():
            self._schedule(loop)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
