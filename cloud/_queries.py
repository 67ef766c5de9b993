"""The queries role: readings (raw or downsampled from the hourly rollup), the series of a
device, the rejection and dead-letter logs and the fleet's activity (the read API and the
dashboard)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from core._clock import now_ms

from ._sql import ROLLUP_MS, SQLBase, tags_obj

__all__ = ["MAX_READINGS_LIMIT", "MAX_TS_MS", "Queries", "QueriesSQL", "ReadingsQuery"]

MAX_READINGS_LIMIT = 10_000
#: Query times (ms) are bounded to 1970..2100: the bucket arithmetic stays in 64 bits.
MAX_TS_MS = 4_102_444_800_000
_BIG = sys.float_info.max


def _num(x: Any) -> float | None:
    """An aggregate as JSON can carry it: never inf or NaN (rows stored before values were
    bounded may hold sums that overflowed)."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return None
    return max(-_BIG, min(_BIG, x))


@dataclass(frozen=True, slots=True)
class ReadingsQuery:
    device: str
    metric: str | None = None
    source: str | None = None
    since: int | None = None  # inclusive, ms
    until: int | None = None  # exclusive, ms
    limit: int = 1000
    step: int | None = None  # ms; None = raw rows unless there are more than ``limit``


@runtime_checkable
class Queries(Protocol):
    """What operators read.  Every method blocks; :class:`UnknownDevice` for a device name
    that is not registered (where a device is required)."""

    def device_metrics(self, name: str) -> list[dict[str, Any]]: ...

    def readings(self, q: ReadingsQuery) -> dict[str, Any]: ...

    def count_readings(self, device: str) -> int: ...

    def rejections(
        self, device: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[dict[str, Any]]: ...

    def dead_letters(
        self, device: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[dict[str, Any]]: ...

    def device_activity(self, since: int) -> dict[str, dict[str, Any]]:
        """Per device name: ``newest_ts`` (newest reading stored, ms or None) and
        ``rejections`` (rejected requests since ``since``)."""


class QueriesSQL(SQLBase):
    def rejections(
        self, device: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[dict[str, Any]]:
        where, args = self._log_filter("device", "id", device, before)
        with self._read() as cur:
            cur.execute(
                self._q(
                    f"SELECT id, device, ts_ms, reason, detail, remote FROM rejections {where} "
                    "ORDER BY id DESC LIMIT ?"
                ),
                (*args, limit),
            )
            return [
                dict(zip(("id", "device", "ts_ms", "reason", "detail", "remote"), r, strict=True))
                for r in cur.fetchall()
            ]

    def dead_letters(
        self, device: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[dict[str, Any]]:
        where, args = self._log_filter("d.name", "dl.received_ms", device, before)
        cols = ("device", "seq", "ts", "topic", "stage", "reason", "size", "received_ms")
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT d.name, dl.seq, dl.ts, dl.topic, dl.stage, dl.reason, dl.size, "
                    "dl.received_ms FROM dead_letters dl JOIN devices d ON d.id = dl.device_id "
                    f"{where} ORDER BY dl.received_ms DESC, dl.seq DESC LIMIT ?"
                ),
                (*args, limit),
            )
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    # -- queries ---------------------------------------------------------------------------
    def device_metrics(self, name: str) -> list[dict[str, Any]]:
        with self._read() as cur:
            did = self._device_id(cur, name)
            cur.execute(
                # Counts from the hourly rollup, ends by index seeks: no scan of the readings.
                self._q(
                    "SELECT s.source, s.metric, s.tags, "
                    "(SELECT coalesce(sum(h.n), 0) FROM readings_hourly h WHERE h.series_id = s.id), "
                    "(SELECT min(r.ts) FROM readings r WHERE r.series_id = s.id), "
                    "(SELECT max(r.ts) FROM readings r WHERE r.series_id = s.id) "
                    "FROM series s WHERE s.device_id = ? ORDER BY s.metric, s.source, s.tags"
                ),
                (did,),
            )
            return [
                {
                    "source": r[0],
                    "metric": r[1],
                    "tags": tags_obj(r[2]),
                    "count": int(r[3]),
                    "first_ts": r[4],
                    "last_ts": r[5],
                }
                for r in cur.fetchall()
            ]

    def count_readings(self, device: str) -> int:
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT count(*) FROM readings r JOIN series s ON s.id = r.series_id "
                    "JOIN devices d ON d.id = s.device_id WHERE d.name = ?"
                ),
                (device,),
            )
            return cur.fetchone()[0]

    def readings(self, q: ReadingsQuery) -> dict[str, Any]:
        limit = max(1, min(q.limit, MAX_READINGS_LIMIT))
        until = q.until if q.until is not None else now_ms() + 1
        until = max(1, min(until, MAX_TS_MS))
        since = q.since if q.since is not None else until - 24 * 3600 * 1000
        since = max(0, min(since, until - 1))
        with self._read() as cur:
            did = self._device_id(cur, q.device)
            where = "s.device_id = ? AND r.ts >= ? AND r.ts < ?"
            args: list[Any] = [did, since, until]
            if q.metric is not None:
                where += " AND s.metric = ?"
                args.append(q.metric)
            if q.source is not None:
                where += " AND s.source = ?"
                args.append(q.source)
            base = f"FROM readings r JOIN series s ON s.id = r.series_id WHERE {where}"
            step = q.step
            if step is None:
                # Bounded: never counts past limit + 1 rows, however long the range.
                cur.execute(
                    self._q(f"SELECT count(*) FROM (SELECT 1 {base} LIMIT ?) AS probe"),
                    (*args, limit + 1),
                )
                total = cur.fetchone()[0]
                sw = where.replace(" AND r.ts >= ? AND r.ts < ?", "")
                cur.execute(
                    self._q(f"SELECT count(*) FROM series s WHERE {sw}"), [args[0], *args[3:]]
                )
                nseries = cur.fetchone()[0]
                if total > limit:
                    # Buckets so that every series fits: nseries * buckets <= limit.
                    per_series = max(1, limit // max(1, nseries))
                    step = max(1, math.ceil((until - since) / per_series))
            if step is None:
                cur.execute(
                    self._q(
                        f"SELECT s.source, s.metric, s.tags, r.ts, r.val, r.flags {base} "
                        "ORDER BY r.ts, s.id LIMIT ?"
                    ),
                    (*args, limit + 1),
                )
                rows = cur.fetchall()
                out = [
                    {
                        "source": r[0],
                        "metric": r[1],
                        "tags": tags_obj(r[2]),
                        "ts": r[3],
                        "value": _num(r[4]),
                        "flags": r[5],
                    }
                    for r in rows[:limit]
                ]
            else:
                step = min(int(step), MAX_TS_MS)
                if step < 1:
                    raise ValueError("step must be >= 1 ms")
                # Integer arithmetic both dialects agree on; ts >= since keeps it non-negative.
                since_i = int(since)
                if step % ROLLUP_MS == 0 and since % ROLLUP_MS == 0 and until % ROLLUP_MS == 0:
                    # Whole hours: aggregate the hourly rollup, not the raw rows (exact).
                    bucket = f"({since_i} + ((r.hour - {since_i}) / {step}) * {step})"
                    sql = (
                        f"SELECT {bucket} AS bucket, s.source, s.metric, s.tags, "
                        "sum(r.total) / sum(r.n), min(r.lo), max(r.hi), sum(r.n) "
                        "FROM readings_hourly r JOIN series s ON s.id = r.series_id WHERE "
                        + where.replace("r.ts", "r.hour")
                    )
                else:
                    bucket = f"({since_i} + ((r.ts - {since_i}) / {step}) * {step})"
                    sql = (
                        f"SELECT {bucket} AS bucket, s.source, s.metric, s.tags, avg(r.val), "
                        f"min(r.val), max(r.val), count(*) {base}"
                    )
                cur.execute(
                    self._q(f"{sql} GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 LIMIT ?"),
                    (*args, limit + 1),
                )
                rows = cur.fetchall()
                out = [
                    {
                        "source": r[1],
                        "metric": r[2],
                        "tags": tags_obj(r[3]),
                        "ts": int(r[0]),
                        "avg": _num(r[4]),
                        "min": _num(r[5]),
                        "max": _num(r[6]),
                        "count": int(r[7]),
                    }
                    for r in rows[:limit]
                ]
        return {
            "device": q.device,
            "since": since,
            "until": until,
            "step": step,
            "truncated": len(rows) > limit,
            "rows": out,
        }

    # -- fleet activity (the dashboard) ----------------------------------------------------
    def device_activity(self, since: int) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with self._read() as cur:
            # One index seek per series on readings (series_id, ts): cheap at any table size.
            cur.execute(
                "SELECT d.name, max((SELECT max(r.ts) FROM readings r WHERE r.series_id = s.id)) "
                "FROM devices d LEFT JOIN series s ON s.device_id = d.id GROUP BY d.name"
            )
            for name, newest in cur.fetchall():
                out[name] = {"newest_ts": newest, "rejections": 0}
            cur.execute(
                self._q(
                    "SELECT device, count(*) FROM rejections WHERE ts_ms >= ? "
                    "AND device IS NOT NULL GROUP BY device"
                ),
                (since,),
            )
            for name, n in cur.fetchall():
                if name in out:
                    out[name]["rejections"] = n
        return out
