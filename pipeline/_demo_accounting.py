"""The demo's reading accounting: each edge's ``/metrics`` read into :class:`Totals`, and the
identity every line of the demo's status shows (received = filtered out + dead-lettered +
in flight + stored - created by stages)."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

__all__ = ["Totals", "scrape"]


@dataclass
class Totals:
    """One edge's (or the sum of several edges') reading accounting, from ``/metrics``."""

    received: float = 0  # edgepipe_readings_in_total
    filtered: float = 0  # dropped by a stage: filtered or aggregated
    dead_lettered: float = 0  # dropped by a failing stage into a dead letter
    in_flight: float = 0  # through the chain, commit in progress
    stored: float = 0  # edgepipe_readings_stored_total
    created: float = 0  # edgepipe_readings_emitted_total: aggregates
    synced: float = 0  # edgepipe_readings_synced_total
    backlog: float = 0  # edgepipe_sync_backlog_readings
    quota_dropped: float = 0  # stored, then dropped by the store quota (drop_oldest)
    dead_letters: float = 0  # dead-letter records (messages or batches)
    acked: float = 0  # QoS 1 messages acknowledged

    @classmethod
    def parse(cls, text: str) -> Totals:
        t = cls()
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            try:
                v = float(value)
            except ValueError:
                continue
            if name == "edgepipe_readings_dropped_total":
                if 'stage="store"' in labels:
                    t.quota_dropped += v
                elif 'reason="dead_letter"' in labels:
                    t.dead_lettered += v
                else:
                    t.filtered += v
                continue
            field = _FIELDS.get(name)
            if field is not None:
                setattr(t, field, getattr(t, field) + v)
        return t

    def __add__(self, other: Totals) -> Totals:
        return Totals(**{k: getattr(self, k) + getattr(other, k) for k in self.__dict__})

    @property
    def unaccounted(self) -> float:
        """Zero when ``received = filtered + dead-lettered + in flight + stored - created``."""
        return self.received - (
            self.filtered + self.dead_lettered + self.in_flight + self.stored - self.created
        )

    def lines(self, published: int, label: str) -> list[str]:
        ok = "adds up" if self.unaccounted == 0 else f"OFF BY {self.unaccounted:,.0f}"
        return [
            f"{label}  published {published:,} msgs | stored {self.stored:,.0f} readings | "
            f"synced {self.synced:,.0f} | backlog {self.backlog:,.0f} | "
            f"dead letters {self.dead_letters:,.0f}",
            f"{'':{len(label)}}  received {self.received:,.0f} = filtered out "
            f"{self.filtered:,.0f} + dead-lettered {self.dead_lettered:,.0f} + in flight "
            f"{self.in_flight:,.0f} + stored {self.stored:,.0f} - created by stages "
            f"{self.created:,.0f}  ({ok})",
        ]


_FIELDS = {
    "edgepipe_readings_in_total": "received",
    "edgepipe_readings_in_flight": "in_flight",
    "edgepipe_readings_stored_total": "stored",
    "edgepipe_readings_emitted_total": "created",
    "edgepipe_readings_synced_total": "synced",
    "edgepipe_sync_backlog_readings": "backlog",
    "edgepipe_dead_letters_total": "dead_letters",
    "edgepipe_messages_acked_total": "acked",
}


def scrape(port: int) -> Totals | None:
    """An edge process's accounting from its ``/metrics`` (None if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return Totals.parse(r.read().decode())
    except OSError:
        return None
