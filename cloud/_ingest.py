"""The ingest role: uploads stored atomically and idempotently on (device, seq), the
nonces that make every request single-use, and the log of refused uploads."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from core._clock import utc_day

from ._errors import NonceReplayed, SequenceConflict, SeriesLimitExceeded
from ._sql import ROLLUP_MS, SQLBase, chunks, tags_text
from ._wire import Upload, WireLimits

__all__ = ["Ingest", "IngestResult", "IngestSQL", "REJECTION_LOG_ROWS"]

#: Rejections kept in the log; older rows are pruned so a flood can't fill the disk.
REJECTION_LOG_ROWS = 10_000


@dataclass(frozen=True, slots=True)
class IngestResult:
    acked: list[int]
    duplicates: list[int]
    readings: int


@runtime_checkable
class Ingest(Protocol):
    """Where uploads land.  Every method blocks."""

    def nonce_seen(self, device: str, nonce: str, now: int) -> bool: ...

    def ingest(
        self,
        upload: Upload,
        *,
        link: str,
        nbytes: int,
        nonce: str,
        nonce_expires: int,
        now: int,
    ) -> IngestResult:
        """Store an upload atomically: all new batches, the nonce, the dead letters and the
        device status in one durable transaction.  Raises :class:`SequenceConflict` (nothing
        stored) or :class:`NonceReplayed` if the nonce was stored meanwhile (nothing stored);
        :class:`UnknownDevice` if the device was removed meanwhile."""

    def record_rejection(
        self,
        device: str | None,
        reason: str,
        detail: str,
        remote: str | None,
        now: int,
        *,
        authenticated: bool = False,
    ) -> None:
        """Log a refused upload; if ``device`` is named, also set its ``last_error`` (and
        ``last_seen`` when the request carried its valid signature)."""


class _SeriesQuota:
    """The series one upload may still create: per request, and for the device in all
    (its stored count is read once, when the first new series is about to be created)."""

    __slots__ = ("device", "did", "limits", "new", "stored")

    def __init__(self, device: str, did: int, limits: WireLimits) -> None:
        self.device, self.did, self.limits = device, did, limits
        self.new = 0
        self.stored: int | None = None

    def take(self, store: SQLBase, cur: Any) -> None:
        lim = self.limits
        self.new += 1
        if self.new > lim.max_new_series_per_request:
            raise SeriesLimitExceeded(self.device, "request", lim.max_new_series_per_request)
        if self.stored is None:
            cur.execute(store._q("SELECT count(*) FROM series WHERE device_id = ?"), (self.did,))
            self.stored = cur.fetchone()[0]
        if self.stored + self.new > lim.max_series_per_device:
            raise SeriesLimitExceeded(self.device, "device", lim.max_series_per_device)


class IngestSQL(SQLBase):
    def _store_device_records(self, cur: Any, did: int, upload: Upload, now: int) -> None:
        """Health snapshots and logs, in the upload's transaction (``cloud._health``)."""

    # -- nonces --------------------------------------------------------------------------
    def nonce_seen(self, device: str, nonce: str, now: int) -> bool:
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT 1 FROM nonces n JOIN devices d ON d.id = n.device_id "
                    "WHERE d.name = ? AND n.nonce = ? AND n.expires_ms >= ?"
                ),
                (device, nonce, now),
            )
            return cur.fetchone() is not None

    # -- ingest --------------------------------------------------------------------------
    def ingest(
        self,
        upload: Upload,
        *,
        link: str,
        nbytes: int,
        nonce: str,
        nonce_expires: int,
        now: int,
    ) -> IngestResult:
        q = self._q
        with self._write() as cur:
            did = self._device_id(cur, upload.device, lock=True)
            # The nonce is consumed by the same transaction that stores the data: a request
            # that is refused stores nothing, not even its nonce.
            cur.execute(q("DELETE FROM nonces WHERE device_id = ? AND expires_ms < ?"), (did, now))
            cur.execute(
                q(
                    "INSERT INTO nonces (device_id, nonce, expires_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (device_id, nonce) DO NOTHING"
                ),
                (did, nonce, nonce_expires),
            )
            if cur.rowcount != 1:
                raise NonceReplayed(upload.device)

            # Decide every batch before writing any: a conflict anywhere refuses the request.
            stored: dict[int, str] = {}
            seqs = sorted({b.seq for b in upload.batches})
            for part in chunks(seqs, 500):
                marks = ", ".join("?" * len(part))
                cur.execute(
                    q(f"SELECT seq, sha256 FROM batches WHERE device_id = ? AND seq IN ({marks})"),
                    (did, *part),
                )
                stored.update(cur.fetchall())
            acked: list[int] = []
            duplicates: list[int] = []
            new = []
            for b in upload.batches:  # already in seq order
                prev = stored.get(b.seq)
                if prev is None:
                    stored[b.seq] = b.sha256
                    new.append(b)
                    acked.append(b.seq)
                elif prev == b.sha256:
                    duplicates.append(b.seq)
                    acked.append(b.seq)
                else:
                    raise SequenceConflict(upload.device, b.seq)

            nreadings = 0
            series_ids: dict[tuple[str, str, str], int] = {}
            quota = _SeriesQuota(upload.device, did, upload.limits)
            for b in new:
                local = []
                used = set(b.sid)  # a series nothing refers to is never created
                for i, (source, metric, tags) in enumerate(b.series):
                    if i not in used:
                        local.append(-1)
                        continue
                    key = (source, metric, tags_text(tags))
                    sid = series_ids.get(key)
                    if sid is None:
                        sid = series_ids[key] = self._series_id(cur, did, key, quota)
                    local.append(sid)
                rows = [
                    (local[s], t, v, f, b.seq)
                    for s, t, v, f in zip(b.sid, b.ts, b.val, b.flags, strict=True)
                ]
                if rows:
                    self._copy_readings(cur, rows)
                    self._roll_up(cur, rows)
                cur.execute(
                    q(
                        "INSERT INTO batches (device_id, seq, sha256, readings, received_ms) "
                        "VALUES (?, ?, ?, ?, ?)"
                    ),
                    (did, b.seq, b.sha256, len(rows), now),
                )
                nreadings += len(rows)

            if upload.dead_letters:
                cur.executemany(
                    q(
                        "INSERT INTO dead_letters "
                        "(device_id, seq, ts, topic, stage, reason, size, received_ms) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, seq) DO NOTHING"
                    ),
                    [
                        (did, d.seq, d.ts, d.topic, d.stage, d.reason, d.size, now)
                        for d in upload.dead_letters
                    ],
                )
            self._store_device_records(cur, did, upload, now)
            last_seq = max(acked) if acked else None
            cur.execute(
                q(
                    "UPDATE devices SET last_seen_ms = ?, last_sync_ms = ?, last_link = ?, "
                    "status = ?, last_seq = CASE WHEN last_seq IS NULL OR last_seq < ? "
                    "THEN ? ELSE last_seq END WHERE id = ?"
                ),
                (
                    now,
                    now,
                    link,
                    json.dumps(upload.status, separators=(",", ":")),
                    last_seq,
                    last_seq,
                    did,
                ),
            )
            cur.execute(
                q(
                    "INSERT INTO device_daily (device_id, day, readings, bytes, uploads) "
                    "VALUES (?, ?, ?, ?, 1) ON CONFLICT (device_id, day) DO UPDATE SET "
                    "readings = device_daily.readings + excluded.readings, "
                    "bytes = device_daily.bytes + excluded.bytes, "
                    "uploads = device_daily.uploads + 1"
                ),
                (did, utc_day(now), nreadings, nbytes),
            )
        return IngestResult(acked, duplicates, nreadings)

    def _roll_up(self, cur: Any, rows: list[tuple[int, int, float, int, int]]) -> None:
        """Fold new readings into ``readings_hourly`` (same transaction as the readings)."""
        # Group values per (series, hour), then let the C builtins aggregate each group.
        groups: dict[tuple[int, int], list[float]] = {}
        for sid, ts, val, _flags, _seq in rows:
            groups.setdefault((sid, ts - ts % ROLLUP_MS), []).append(val)
        cur.executemany(
            self._q(
                "INSERT INTO readings_hourly (series_id, hour, n, total, lo, hi) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (series_id, hour) DO UPDATE SET "
                "n = readings_hourly.n + excluded.n, "
                "total = readings_hourly.total + excluded.total, "
                "lo = CASE WHEN excluded.lo < readings_hourly.lo "
                "THEN excluded.lo ELSE readings_hourly.lo END, "
                "hi = CASE WHEN excluded.hi > readings_hourly.hi "
                "THEN excluded.hi ELSE readings_hourly.hi END"
            ),
            # fsum: exact, and the wire bounds every value so that no sum can overflow.
            [
                (sid, hour, len(v), math.fsum(v), min(v), max(v))
                for (sid, hour), v in groups.items()
            ],
        )

    def _series_id(self, cur: Any, did: int, key: tuple[str, str, str], quota: _SeriesQuota) -> int:
        q = self._q
        cur.execute(
            q(
                "SELECT id FROM series WHERE device_id = ? AND source = ? AND metric = ? AND tags = ?"
            ),
            (did, *key),
        )
        row = cur.fetchone()
        if row is None:
            quota.take(self, cur)
            cur.execute(
                q(
                    "INSERT INTO series (device_id, source, metric, tags) VALUES (?, ?, ?, ?) RETURNING id"
                ),
                (did, *key),
            )
            row = cur.fetchone()
        return row[0]

    # -- rejections ------------------------------------------------------------------------
    def record_rejection(
        self,
        device: str | None,
        reason: str,
        detail: str,
        remote: str | None,
        now: int,
        *,
        authenticated: bool = False,
    ) -> None:
        q = self._q
        with self._write() as cur:
            cur.execute(
                q(
                    "INSERT INTO rejections (device, ts_ms, reason, detail, remote) "
                    "VALUES (?, ?, ?, ?, ?) RETURNING id"
                ),
                (device, now, reason, detail[:1000], remote),
            )
            rid = cur.fetchone()[0]
            if rid % 100 == 0:
                cur.execute(q("DELETE FROM rejections WHERE id <= ?"), (rid - REJECTION_LOG_ROWS,))
            if device is not None:
                seen = ", last_seen_ms = ?" if authenticated else ""
                cur.execute(
                    q(f"UPDATE devices SET last_error = ?, last_error_ms = ?{seen} WHERE name = ?"),
                    (f"{reason}: {detail[:500]}", now, *([now] if authenticated else []), device),
                )
