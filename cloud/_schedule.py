"""The receiver's evaluation schedule, shared by the alert and rollout engines.

An engine evaluates everything every ``every_s`` seconds and, between those full rounds,
the devices something was just stored for (an upload, a check-in) as soon as the loop is
free: :meth:`EvaluationSchedule.mark` never blocks the request that calls it; the
evaluation itself (blocking database work) runs on a worker thread.  A failed evaluation
is kept in ``last_error`` and the next round tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

__all__ = ["EvaluationSchedule"]

log = logging.getLogger(__name__)


class EvaluationSchedule:
    """Calls ``evaluate(None)`` every ``every_s`` seconds and ``evaluate(devices)`` for the
    devices marked since, soon; ``what`` names it in the log ("alert", "rollout")."""

    def __init__(
        self, evaluate: Callable[[set[str] | None], object], every_s: float, what: str
    ) -> None:
        self._evaluate, self.every_s, self.what = evaluate, every_s, what
        self._pending: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    def mark(self, device: str) -> None:
        """Something of ``device`` was stored: evaluate it soon.  Never blocks."""
        self._pending.add(device)
        if self._wake is not None:
            self._wake.set()

    def start(self) -> None:
        """Start the schedule on the running loop (idempotent)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"{self.what}-evaluator")

    async def stop(self) -> None:
        """Stop the schedule (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        next_full = loop.time()
        while True:
            wait = next_full - loop.time()
            if wait > 0 and not self._pending:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
            self._wake.clear()
            devices: set[str] | None
            if loop.time() >= next_full:
                devices, next_full = None, loop.time() + self.every_s
                self._pending.clear()
            else:
                devices, self._pending = self._pending, set()
            try:
                await asyncio.to_thread(self._evaluate, devices)
                self.last_error = None
            except Exception as e:  # the database is away: the next round tries again
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("%s evaluation failed: %s", self.what, self.last_error)
