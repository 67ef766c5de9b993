"""The device-health role: health snapshots and warning logs per device, with retention
(docs/health.md).

Records arrive with an upload and are stored by the upload's own transaction
(:meth:`HealthSQL._store_device_records`, called by the ingest role), idempotent on
(device, record seq).  Retention bounds what one device can make the receiver keep, by age
and by count, trimmed as records arrive: at most :data:`HEALTH_KEEP` snapshots and
:data:`LOGS_KEEP` log records per device, none older than :data:`RETENTION_MS`.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

from ._sql import SQLBase, chunks

__all__ = ["EXACT_MAX", "HEALTH_KEEP", "LOGS_KEEP", "RETENTION_MS", "Health", "HealthSQL"]

#: Snapshots kept per device (a month of one a minute).
HEALTH_KEEP = 45_000
#: Log records (each de-duplicated, with a count) kept per device.
LOGS_KEEP = 10_000
#: Neither is kept longer than this.
RETENTION_MS = 31 * 86_400_000
#: Most rows one query returns.
QUERY_MAX = 5_000
#: A health chart range with at most this many snapshots gets every one (counters exact
#: across restarts); one with more, the last snapshot of each bucket.
EXACT_MAX = 5_000


@runtime_checkable
class Health(Protocol):
    """Per device: its health snapshots and warning log records."""

    def device_health(
        self, name: str, since: int | None = None, until: int | None = None, limit: int = 2000
    ) -> list[dict[str, Any]]:
        """Snapshots in [since, until), oldest first: ``{"seq", "ts", "values"}``."""

    def device_logs(
        self,
        name: str,
        *,
        level: str | None = None,
        text: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """Log records, newest first, at ``level`` or above, containing ``text``."""

    def latest_health(self) -> dict[str, dict[str, Any]]:
        """Per device name: its newest snapshot (``{"ts", "values"}``)."""

    def health_buckets(
        self, name: str, since: int, until: int, step: int
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The last snapshot before ``since`` (or None) and the snapshots of [since,
        until), oldest first: every one if there are at most :data:`EXACT_MAX`, else the
        last of each ``step``-wide bucket."""

    def health_overview(self, window_since: int) -> dict[str, dict[str, Any]]:
        """Per device name that has snapshots: ``{"newest", "first", "count", "span_ms"}``
        -- its newest snapshot, the oldest since ``window_since`` (None if none is that
        recent), how many are that recent and the time between the two."""

    def logs(
        self,
        device: str | None = None,
        *,
        level: str | None = None,
        text: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
        before: tuple[int, int, int] | None = None,
    ) -> list[dict[str, Any]]:
        """Log records of one device or of all, newest first (by time, then device, then
        record), at ``level`` or above, containing ``text``; a page ends ``before`` the
        cursor ``(ts, device id, seq)`` of the last record of the previous page."""


_LEVELS = ("WARNING", "ERROR", "CRITICAL")


class HealthSQL(SQLBase):
    def _store_device_records(self, cur: Any, did: int, upload: Any, now: int) -> None:
        q = self._q
        if upload.health:
            skew = upload.clock_skew_ms  # the signed timestamp against our clock

            def data(values: dict[str, Any]) -> str:
                if skew is not None:
                    values = {**values, "receiver_skew_ms": -skew}
                return json.dumps(values, separators=(",", ":"))

            cur.executemany(
                q(
                    "INSERT INTO device_health (device_id, seq, ts, data, received_ms) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, seq) DO NOTHING"
                ),
                [(did, h.seq, h.ts, data(h.values), now) for h in upload.health],
            )
            self._trim(cur, "device_health", did, HEALTH_KEEP, now)
        if upload.logs:
            cur.executemany(
                q(
                    "INSERT INTO device_logs "
                    "(device_id, seq, ts, last_ts, level, logger, msg, n, received_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, seq) DO NOTHING"
                ),
                [
                    (did, r.seq, r.ts, r.last, r.level, r.logger, r.msg, r.n, now)
                    for r in upload.logs
                ],
            )
            self._trim(cur, "device_logs", did, LOGS_KEEP, now)

    def _trim(self, cur: Any, table: str, did: int, keep: int, now: int) -> None:
        q = self._q
        cur.execute(
            q(f"DELETE FROM {table} WHERE device_id = ? AND ts < ?"), (did, now - RETENTION_MS)
        )
        cur.execute(
            q(f"SELECT seq FROM {table} WHERE device_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?"),
            (did, keep),
        )
        row = cur.fetchone()
        if row is not None:
            cur.execute(q(f"DELETE FROM {table} WHERE device_id = ? AND seq <= ?"), (did, row[0]))

    def device_health(
        self, name: str, since: int | None = None, until: int | None = None, limit: int = 2000
    ) -> list[dict[str, Any]]:
        where, args = self._range(since, until)
        limit = max(1, min(limit, QUERY_MAX))
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT seq, ts, data FROM (SELECT h.seq, h.ts, h.data FROM device_health h "
                    f"JOIN devices d ON d.id = h.device_id WHERE d.name = ?{where} "
                    "ORDER BY h.ts DESC LIMIT ?) t ORDER BY ts"
                ),
                (name, *args, limit),
            )
            return [_snapshot(*row) for row in cur.fetchall()]

    def device_logs(
        self,
        name: str,
        *,
        level: str | None = None,
        text: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        rows = self.logs(name, level=level, text=text, since=since, until=until, limit=limit)
        for r in rows:
            del r["device"], r["cursor"]
        return rows

    def logs(
        self,
        device: str | None = None,
        *,
        level: str | None = None,
        text: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
        before: tuple[int, int, int] | None = None,
    ) -> list[dict[str, Any]]:
        where, args = self._range(since, until)
        if device is not None:
            where += " AND d.name = ?"
            args.append(device)
        if level is not None and level.upper() in _LEVELS:
            levels = _LEVELS[_LEVELS.index(level.upper()) :]
            where += f" AND h.level IN ({', '.join('?' * len(levels))})"
            args.extend(levels)
        if text:
            where += " AND lower(h.msg) LIKE ? ESCAPE '\\'"
            esc = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args.append(f"%{esc}%")
        if before is not None:
            where += " AND (h.ts < ? OR (h.ts = ? AND (h.device_id < ? OR (h.device_id = ? AND h.seq < ?))))"
            ts, did, seq = before
            args.extend((ts, ts, did, did, seq))
        limit = max(1, min(limit, QUERY_MAX))
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT d.name, h.device_id, h.seq, h.ts, h.last_ts, h.level, h.logger, "
                    "h.msg, h.n FROM device_logs h JOIN devices d ON d.id = h.device_id "
                    f"WHERE 1 = 1{where} ORDER BY h.ts DESC, h.device_id DESC, h.seq DESC "
                    "LIMIT ?"
                ),
                (*args, limit),
            )
            keys = ("seq", "ts", "last", "level", "logger", "msg", "n")
            return [
                {"device": name, **dict(zip(keys, rest, strict=True)),
                 "cursor": f"{rest[1]}.{did}.{rest[0]}"}
                for name, did, *rest in cur.fetchall()
            ]  # fmt: skip

    def health_buckets(
        self, name: str, since: int, until: int, step: int
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        step = max(1, int(step))
        with self._read() as cur:
            cur.execute(self._q("SELECT id FROM devices WHERE name = ?"), (name,))
            row = cur.fetchone()
            if row is None:
                return None, []
            did = row[0]
            cur.execute(
                self._q(
                    "SELECT seq, ts, data FROM device_health WHERE device_id = ? AND ts < ? "
                    "ORDER BY ts DESC, seq DESC LIMIT 1"
                ),
                (did, since),
            )
            base = cur.fetchone()
            cur.execute(
                self._q(
                    "SELECT count(*) FROM device_health WHERE device_id = ? AND ts >= ? AND ts < ?"
                ),
                (did, since, until),
            )
            if cur.fetchone()[0] <= EXACT_MAX:
                cur.execute(
                    self._q(
                        "SELECT seq, ts, data FROM device_health WHERE device_id = ? "
                        "AND ts >= ? AND ts < ? ORDER BY ts, seq"
                    ),
                    (did, since, until),
                )
            else:  # ts >= since >= 0: (ts - since) / step is a row's bucket in both dialects
                cur.execute(
                    self._q(
                        "SELECT h.seq, h.ts, h.data FROM device_health h JOIN ("
                        "SELECT max(seq) AS seq FROM device_health "
                        "WHERE device_id = ? AND ts >= ? AND ts < ? GROUP BY (ts - ?) / ?"
                        ") b ON b.seq = h.seq WHERE h.device_id = ? ORDER BY h.ts, h.seq"
                    ),
                    (did, since, until, since, step, did),
                )
            rows = [_snapshot(*r) for r in cur.fetchall()]
        return (_snapshot(*base) if base else None), rows

    def health_overview(self, window_since: int) -> dict[str, dict[str, Any]]:
        # Index seeks per device (the newest by primary key, the look-back through
        # (device_id, ts)), then the snapshots named by primary key: never a scan of every
        # device's snapshots.
        per = "FROM device_health w WHERE w.device_id = d.id AND w.ts >= ?"
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT d.id, d.name, "
                    "(SELECT max(seq) FROM device_health m WHERE m.device_id = d.id), "
                    f"(SELECT w.seq {per} ORDER BY w.ts LIMIT 1), (SELECT count(*) {per}), "
                    f"(SELECT min(w.ts) {per}), (SELECT max(w.ts) {per}) FROM devices d"
                ),
                (window_since,) * 4,
            )
            found = [r for r in cur.fetchall() if r[2] is not None]
            snaps: dict[tuple[int, int], dict[str, Any]] = {}
            wanted = [(did, seq) for did, _, s, lo, *_ in found for seq in {s, lo} if seq]
            for part in chunks(wanted, 200):
                pairs = " OR ".join("(device_id = ? AND seq = ?)" for _ in part)
                cur.execute(
                    self._q(f"SELECT device_id, seq, ts, data FROM device_health WHERE {pairs}"),
                    [x for pair in part for x in pair],
                )
                for did, seq, ts, data in cur.fetchall():
                    snaps[(did, seq)] = _snapshot(seq, ts, data)
        return {
            name: {
                "newest": snaps.get((did, s)),
                "first": snaps.get((did, lo)) if lo is not None else None,
                "count": n,
                "span_ms": (t1 - t0) if n else 0,
            }
            for did, name, s, lo, n, t0, t1 in found
        }

    @staticmethod
    def _range(since: int | None, until: int | None) -> tuple[str, list[Any]]:
        where, args = "", []
        if since is not None:
            where += " AND h.ts >= ?"
            args.append(since)
        if until is not None:
            where += " AND h.ts < ?"
            args.append(until)
        return where, args


def _snapshot(seq: int, ts: int, data: str) -> dict[str, Any]:
    return {"seq": seq, "ts": ts, "values": json.loads(data)}
