"""The one progress bar: on a terminal a bar redrawn at most ten times a second, elsewhere
(a log, ``kubectl logs``) a line every few seconds.  ``edgepipe sync --now``, ``edgepipe
export`` and ``edgepipe keys reencrypt`` report through it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``progress(done)`` (or ``progress(done, total)``) as work advances, ``finish()`` at
    the end.  On a terminal (or with ``bar=True``) a bar that starts with ``label``.

    ``unit`` names what is counted and ``verb`` what is done to it (``synced 1,200/5,000
    readings``).  A total of 0 means unknown: the count and rate are shown without a bar."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        *,
        quiet: bool = False,
        label: str = "",
        unit: str = "readings",
        verb: str = "synced",
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(total, 0)
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.label, self.unit, self.verb = label, unit, verb
        self.tty = self.stream.isatty() if bar is None else bar
        self._clock = clock
        self.t0 = self._last = clock()
        self.done = 0

    def __call__(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = max(total, 0)
        now = self._clock()
        if self.quiet or (self.total == 0 and done == 0):
            return
        final = self.total and done >= self.total
        if not final and now - self._last < (0.1 if self.tty else 5):
            return
        self._last = now
        rate = done / max(now - self.t0, 1e-6)
        of = f"/{self.total:,}" if self.total else ""
        if self.tty:
            frac = min(1.0, done / self.total) if self.total else 0.0
            bar = f"[{'#' * int(frac * 30):<30}] {frac:6.1%} " if self.total else ""
            label = f"{self.label} " if self.label else ""
            self.stream.write(f"\r{label}{bar}{done:,}{of} {self.unit} {rate:,.0f}/s ")
        else:
            self.stream.write(f"{self.verb} {done:,}{of} {self.unit} ({rate:,.0f}/s)\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and not self.quiet and self.done:
            self.stream.write("\n")
            self.stream.flush()
