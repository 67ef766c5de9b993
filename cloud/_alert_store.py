"""The alerts role: each alert's state (firing or resolved), kept in the receiver's database
so that it survives a restart and is shared by every receiver of one database.

An alert is one row per key (``rule:device[:stage]``).  A transition is made by a
conditional write (``... WHERE state = 'resolved'``), so of two evaluations that see the
same condition -- two receivers, or the schedule and an upload -- only one fires it:
one firing per key until it resolves.  ``notified`` is the state last delivered to the
webhooks; a row whose ``notified`` trails its ``state`` (the receiver stopped before it
could deliver) is delivered again at the next start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ._sql import SQLBase

__all__ = ["AlertRow", "AlertState", "AlertStateSQL", "RESOLVED_KEEP_MS"]

#: Resolved alerts are kept this long (the dashboard and ``GET /v1/alerts`` show them).
RESOLVED_KEEP_MS = 30 * 86_400_000

_COLS = (
    "key",
    "rule",
    "kind",
    "device",
    "severity",
    "state",
    "summary",
    "labels",
    "value",
    "started_ms",
    "updated_ms",
    "resolved_ms",
    "notified",
)


@dataclass(slots=True)
class AlertRow:
    """One alert as stored (and as ``GET /v1/alerts`` shows it)."""

    key: str
    rule: str
    kind: str
    device: str
    severity: str
    state: str  # "firing" | "resolved"
    summary: str
    labels: dict[str, str] = field(default_factory=dict)
    value: float | None = None
    started_ms: int = 0
    updated_ms: int = 0
    resolved_ms: int | None = None
    notified: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in _COLS}


def _row(r: tuple[Any, ...]) -> AlertRow:
    d = dict(zip(_COLS, r, strict=True))
    d["labels"] = json.loads(d["labels"] or "{}")
    return AlertRow(**d)


@runtime_checkable
class AlertState(Protocol):
    """Alert state.  Every method blocks."""

    def alerts(
        self, state: str | None = None, device: str | None = None, limit: int = 1000
    ) -> list[AlertRow]:
        """Newest change first; ``state`` "firing" or "resolved" (else both)."""

    def fire_alert(self, alert: AlertRow) -> bool:
        """Make ``alert`` firing; False (nothing written) if it already is."""

    def update_alert(self, key: str, summary: str, value: float | None, now: int) -> None:
        """A firing alert's current text and value (no transition, no notification)."""

    def resolve_alert(self, key: str, now: int) -> AlertRow | None:
        """Resolve a firing alert; None (nothing written) if it is not firing."""

    def alert_notified(self, key: str, state: str, started_ms: int) -> None:
        """Every webhook has ``state`` of this episode (``started_ms``) of the alert."""

    def undelivered_alerts(self) -> list[AlertRow]:
        """Alerts whose last transition was not delivered to the webhooks."""

    def newest_reading(self, device: str, metric: str, source: str | None = None) -> int | None:
        """The newest reading's time (ms) of ``metric`` (from ``source``) of ``device``."""


class AlertStateSQL(SQLBase):
    def alerts(
        self, state: str | None = None, device: str | None = None, limit: int = 1000
    ) -> list[AlertRow]:
        where, args = [], []
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if device is not None:
            where.append("device = ?")
            args.append(device)
        sql = f"SELECT {', '.join(_COLS)} FROM alerts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._read() as cur:
            cur.execute(
                self._q(sql + " ORDER BY updated_ms DESC, key LIMIT ?"),
                (*args, max(1, min(limit, 10_000))),
            )
            return [_row(r) for r in cur.fetchall()]

    def fire_alert(self, alert: AlertRow) -> bool:
        q = self._q
        labels = json.dumps(alert.labels, separators=(",", ":"), sort_keys=True)
        now = alert.started_ms
        with self._write() as cur:
            cur.execute(
                q(
                    "DELETE FROM alerts WHERE state = 'resolved' AND resolved_ms < ? "
                    "AND notified = 'resolved'"
                ),
                (now - RESOLVED_KEEP_MS,),
            )
            cur.execute(
                q(
                    f"INSERT INTO alerts ({', '.join(_COLS)}) "
                    "VALUES (?, ?, ?, ?, ?, 'firing', ?, ?, ?, ?, ?, NULL, NULL) "
                    "ON CONFLICT (key) DO UPDATE SET state = 'firing', rule = excluded.rule, "
                    "kind = excluded.kind, device = excluded.device, "
                    "severity = excluded.severity, summary = excluded.summary, "
                    "labels = excluded.labels, value = excluded.value, "
                    "started_ms = excluded.started_ms, updated_ms = excluded.updated_ms, "
                    "resolved_ms = NULL, notified = NULL WHERE alerts.state = 'resolved'"
                ),
                (
                    alert.key,
                    alert.rule,
                    alert.kind,
                    alert.device,
                    alert.severity,
                    alert.summary,
                    labels,
                    alert.value,
                    now,
                    now,
                ),
            )
            return cur.rowcount == 1

    def update_alert(self, key: str, summary: str, value: float | None, now: int) -> None:
        with self._write() as cur:
            cur.execute(
                self._q(
                    "UPDATE alerts SET summary = ?, value = ? WHERE key = ? AND state = 'firing'"
                ),
                (summary, value, key),
            )

    def resolve_alert(self, key: str, now: int) -> AlertRow | None:
        with self._write() as cur:
            cur.execute(
                self._q(
                    "UPDATE alerts SET state = 'resolved', resolved_ms = ?, updated_ms = ? "
                    f"WHERE key = ? AND state = 'firing' RETURNING {', '.join(_COLS)}"
                ),
                (now, now, key),
            )
            row = cur.fetchone()
            return _row(row) if row is not None else None

    def alert_notified(self, key: str, state: str, started_ms: int) -> None:
        with self._write() as cur:
            cur.execute(
                self._q(
                    "UPDATE alerts SET notified = ? WHERE key = ? AND state = ? AND started_ms = ?"
                ),
                (state, key, state, started_ms),
            )

    def undelivered_alerts(self) -> list[AlertRow]:
        with self._read() as cur:
            cur.execute(
                f"SELECT {', '.join(_COLS)} FROM alerts "
                "WHERE notified IS NULL OR notified <> state ORDER BY updated_ms, key"
            )
            return [_row(r) for r in cur.fetchall()]

    def newest_reading(self, device: str, metric: str, source: str | None = None) -> int | None:
        where, args = "d.name = ? AND s.metric = ?", [device, metric]
        if source is not None:
            where += " AND s.source = ?"
            args.append(source)
        with self._read() as cur:
            # One index seek per matching series on readings (series_id, ts).
            cur.execute(
                self._q(
                    "SELECT max((SELECT max(r.ts) FROM readings r WHERE r.series_id = s.id)) "
                    f"FROM series s JOIN devices d ON d.id = s.device_id WHERE {where}"
                ),
                args,
            )
            row = cur.fetchone()
            return None if row is None or row[0] is None else int(row[0])
