"""The sync worker's status, persisted as a small JSON file next to the store.

``edgepipe status`` (another process) reads it to show the last success, the last error and
the bytes sent per link today; the daily byte budget of metered links survives restarts
because the counters live here.  Written atomically (temp file + rename); never holds a
secret.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core._clock import now_ms, utc_day
from core._fsutil import atomic_write

__all__ = ["SyncState"]


@dataclass
class SyncState:
    last_success_ms: int | None = None
    last_error: str | None = None
    last_error_ms: int | None = None
    last_attempt_ms: int | None = None
    day: str = ""
    bytes_today: dict[str, int] = field(default_factory=dict)
    link: str = "unknown"
    interface: str | None = None
    online: bool = False
    waiting: str | None = None  # why nothing is being sent right now (budget, link down...)
    backlog_batches: int | None = None
    backlog_readings: int | None = None
    oldest_unsynced_ms: int | None = None
    readings_sent_total: int = 0
    updated_ms: int | None = None

    # -- counters -------------------------------------------------------------------------
    def roll_day(self, day: str | None = None) -> None:
        """Start a new day's counters when ``day`` (``YYYY-MM-DD`` in UTC, default: today
        by the system clock) is not the one counted so far."""
        day = day or utc_day()
        if day != self.day:
            self.day, self.bytes_today = day, {}

    def add_bytes(self, link: str, n: int, day: str | None = None) -> None:
        self.roll_day(day)
        self.bytes_today[link] = self.bytes_today.get(link, 0) + n

    def used_today(self, link: str, day: str | None = None) -> int:
        self.roll_day(day)
        return self.bytes_today.get(link, 0)

    # -- persistence ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> SyncState:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError:
            return cls()

    def save(self, path: Path) -> None:
        """Write the state (advisory: rewritten after every attempt, so without fsync, and a
        failed write is tried again at the next save)."""
        self.updated_ms = now_ms()
        try:
            atomic_write(path, json.dumps(asdict(self), sort_keys=True).encode(), durable=False)
        except OSError:
            pass
