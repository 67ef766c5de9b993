"""Storage behind one narrow interface, with the algorithms written once.

:class:`Backend` is the interface the web app talks to.  :class:`SQLBackend` implements it
once in portable SQL (SQLite 3.35+ and PostgreSQL 13+ both speak it: ``ON CONFLICT``,
``RETURNING``, integer division) on top of a handful of dialect hooks that the two concrete
backends fill in (:mod:`cloud._sqlite`, :mod:`cloud._postgres`).  Every method is blocking;
the app runs them in worker threads.

Times are integer milliseconds since the Unix epoch throughout.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from core._clock import now_ms, utc_day

from ._errors import (
    CloudError,
    DeviceExists,
    MasterKeyError,
    OperatorExists,
    Rejected,
    SecretUnreadable,
    SequenceConflict,
    UnknownDevice,
)
from ._secrets import MasterKey, no_master_key
from ._wire import Upload

__all__ = [
    "Backend",
    "IngestResult",
    "ReadingsQuery",
    "SQLBackend",
    "open_backend",
]

log = logging.getLogger("edgepipe.cloud")

#: 1: device secrets in plaintext hex.  2: sealed with the master key (``secret_key_id``).
SCHEMA_VERSION = 2
_HEX_SECRET = re.compile(r"[0-9a-f]{64}")
#: Rejections kept in the log; older rows are pruned so a flood can't fill the disk.
REJECTION_LOG_ROWS = 10_000
MAX_READINGS_LIMIT = 10_000
#: Width of the pre-aggregated buckets kept next to the raw readings (``readings_hourly``):
#: long ranges are downsampled from these instead of scanning every raw row.
ROLLUP_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class IngestResult:
    acked: list[int]
    duplicates: list[int]
    readings: int


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
class Backend(Protocol):
    """What the receiver needs from storage. All methods block; none returns secrets except
    :meth:`get_device_secret`.  Device secrets are stored sealed with ``master_key``; without
    one the backend serves everything except device secrets."""

    master_key: MasterKey | None

    def init(self) -> None:
        """Create or migrate the schema (idempotent).  With a master key: refuse a key that
        is not the one the database was sealed with (:class:`MasterKeyError`, nothing
        written), then seal any secret still stored in plaintext."""

    def close(self) -> None: ...

    def add_device(self, name: str, secret: bytes) -> None:
        """Raises :class:`DeviceExists`, or :class:`MasterKeyError` without a master key."""

    def remove_device(self, name: str) -> bool: ...

    def get_device_secret(self, name: str) -> bytes | None:
        """None for an unknown device; :class:`SecretUnreadable` if the stored secret fails
        authentication, :class:`MasterKeyError` if its key is missing."""

    def rewrap_secrets(self, batch: int = 200) -> int:
        """Re-seal every device secret not sealed with the active master key (one short
        transaction per ``batch`` rows; the others stay readable meanwhile), then forget
        the key checks of keys no row uses.  Returns the number re-sealed."""

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
        stored) or ``Rejected(401, "replay")`` if the nonce was stored meanwhile."""

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

    def list_devices(self) -> list[dict[str, Any]]: ...

    def get_device(self, name: str) -> dict[str, Any] | None: ...

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

    # -- operators and their sessions (the dashboard) --------------------------------------
    def add_operator(self, name: str, pwhash: str) -> None:
        """Raises :class:`OperatorExists`."""

    def operator_hash(self, name: str) -> str | None: ...

    def set_operator_hash(self, name: str, pwhash: str) -> bool: ...

    def remove_operator(self, name: str) -> bool:
        """Removes the operator and ends every session of theirs."""

    def list_operators(self) -> list[dict[str, Any]]: ...

    def create_session(self, key: str, operator: str, csrf: str, now: int, expires: int) -> None:
        """``key`` is a digest of the cookie value (the value itself is never stored)."""

    def get_session(self, key: str, now: int) -> dict[str, Any] | None:
        """``{"operator", "csrf", "expires_ms"}`` of a live session, else None."""

    def delete_session(self, key: str) -> bool: ...


def open_backend(url: str, *, master_key: MasterKey | None = None) -> Backend:
    """``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (the SQLAlchemy
    convention), a bare path, or ``postgresql://user@host:port/db`` (optionally
    ``?schema=name``).  The schema is created or migrated; with ``master_key`` it is checked
    against the database and plaintext device secrets are sealed with it."""
    if url.startswith(("postgresql://", "postgres://")):
        from ._postgres import PostgresBackend

        backend: Backend = PostgresBackend(url)
    else:
        from ._sqlite import SQLiteBackend

        if url.startswith("sqlite:///"):
            path = url.removeprefix("sqlite:///")
        elif "://" in url:
            raise CloudError(f"unsupported database URL scheme in {url.split('://')[0]!r}")
        else:
            path = url
        backend = SQLiteBackend(path)
    backend.master_key = master_key
    try:
        backend.init()
    except BaseException:
        backend.close()
        raise
    return backend


def _tags_text(tags: tuple[tuple[str, str], ...]) -> str:
    return json.dumps(dict(tags), separators=(",", ":"), sort_keys=True) if tags else ""


def _tags_obj(text: str) -> dict[str, str] | None:
    return json.loads(text) if text else None


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class SQLBackend:
    """The storage algorithms, once, in SQL both dialects accept.

    Subclasses provide: ``_write()`` (a context manager yielding a cursor inside one durable
    write transaction), ``_read()`` (a cursor for reads), the DDL type names and
    ``_copy_readings``.  SQL is written with ``?`` placeholders; :meth:`_q` adapts them.
    """

    AUTO_PK = "INTEGER PRIMARY KEY"
    DOUBLE = "REAL"
    LOCK_ROW = ""  # "FOR UPDATE" where row locks exist

    #: Seals device secrets; None: every other method works, device secrets are refused.
    master_key: MasterKey | None = None
    #: Per device name: (key id, sealed, secret).  A hit needs the row to be unchanged, so
    #: a device removed and added again (by another process too) is never served stale.
    _secret_cache: dict[str, tuple[str, str, bytes]]

    # -- dialect hooks -------------------------------------------------------------------
    def _write(self) -> AbstractContextManager[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _q(self, sql: str) -> str:
        return sql

    def _copy_readings(self, cur: Any, rows: list[tuple[int, int, float, int, int]]) -> None:
        cur.executemany(
            self._q("INSERT INTO readings (series_id, ts, val, flags, seq) VALUES (?, ?, ?, ?, ?)"),
            rows,
        )

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> SQLBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema --------------------------------------------------------------------------
    def _ddl(self) -> list[str]:
        pk, dbl = self.AUTO_PK, self.DOUBLE
        return [
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
            f"""CREATE TABLE IF NOT EXISTS devices (
                id {pk},
                name TEXT NOT NULL UNIQUE,
                secret TEXT NOT NULL,
                secret_key_id TEXT,
                created_ms BIGINT NOT NULL,
                last_seen_ms BIGINT,
                last_sync_ms BIGINT,
                last_link TEXT,
                last_seq BIGINT,
                status TEXT,
                last_error TEXT,
                last_error_ms BIGINT)""",
            """CREATE TABLE IF NOT EXISTS device_daily (
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                day TEXT NOT NULL,
                readings BIGINT NOT NULL,
                bytes BIGINT NOT NULL,
                uploads BIGINT NOT NULL,
                PRIMARY KEY (device_id, day))""",
            """CREATE TABLE IF NOT EXISTS batches (
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                seq BIGINT NOT NULL,
                sha256 TEXT NOT NULL,
                readings INTEGER NOT NULL,
                received_ms BIGINT NOT NULL,
                PRIMARY KEY (device_id, seq))""",
            f"""CREATE TABLE IF NOT EXISTS series (
                id {pk},
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                source TEXT NOT NULL,
                metric TEXT NOT NULL,
                tags TEXT NOT NULL,
                UNIQUE (device_id, source, metric, tags))""",
            f"""CREATE TABLE IF NOT EXISTS readings (
                series_id BIGINT NOT NULL REFERENCES series(id) ON DELETE CASCADE,
                ts BIGINT NOT NULL,
                val {dbl} NOT NULL,
                flags BIGINT NOT NULL,
                seq BIGINT NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS readings_series_ts ON readings (series_id, ts)",
            """CREATE TABLE IF NOT EXISTS nonces (
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                nonce TEXT NOT NULL,
                expires_ms BIGINT NOT NULL,
                PRIMARY KEY (device_id, nonce))""",
            "CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_ms)",
            f"""CREATE TABLE IF NOT EXISTS rejections (
                id {pk},
                device TEXT,
                ts_ms BIGINT NOT NULL,
                reason TEXT NOT NULL,
                detail TEXT NOT NULL,
                remote TEXT)""",
            "CREATE INDEX IF NOT EXISTS rejections_device ON rejections (device, id)",
            """CREATE TABLE IF NOT EXISTS dead_letters (
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                seq BIGINT NOT NULL,
                ts BIGINT NOT NULL,
                topic TEXT NOT NULL,
                stage TEXT,
                reason TEXT NOT NULL,
                size BIGINT NOT NULL,
                received_ms BIGINT NOT NULL,
                PRIMARY KEY (device_id, seq))""",
            f"""CREATE TABLE IF NOT EXISTS readings_hourly (
                series_id BIGINT NOT NULL REFERENCES series(id) ON DELETE CASCADE,
                hour BIGINT NOT NULL,
                n BIGINT NOT NULL,
                total {dbl} NOT NULL,
                lo {dbl} NOT NULL,
                hi {dbl} NOT NULL,
                PRIMARY KEY (series_id, hour))""",
            "CREATE INDEX IF NOT EXISTS rejections_ts ON rejections (ts_ms)",
            f"""CREATE TABLE IF NOT EXISTS operators (
                id {pk},
                name TEXT NOT NULL UNIQUE,
                pwhash TEXT NOT NULL,
                created_ms BIGINT NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS sessions (
                key TEXT PRIMARY KEY,
                operator_id BIGINT NOT NULL REFERENCES operators(id) ON DELETE CASCADE,
                csrf TEXT NOT NULL,
                created_ms BIGINT NOT NULL,
                expires_ms BIGINT NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_ms)",
            """CREATE TABLE IF NOT EXISTS master_keys (
                key_id TEXT PRIMARY KEY,
                key_check TEXT NOT NULL,
                created_ms BIGINT NOT NULL)""",
        ]

    def init(self) -> None:
        with self._write() as cur:
            for stmt in self._ddl():
                cur.execute(stmt)
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            if row is None:
                cur.execute(
                    self._q("INSERT INTO schema_version (version) VALUES (?)"), (SCHEMA_VERSION,)
                )
            elif row[0] > SCHEMA_VERSION:
                raise CloudError(
                    f"database schema version {row[0]} is newer than this edgepipe-cloud "
                    f"({SCHEMA_VERSION}); upgrade edgepipe-cloud"
                )
            elif row[0] < 2:
                # Version 1 kept device secrets in plaintext; NULL key id marks such a row.
                cur.execute("ALTER TABLE devices ADD COLUMN secret_key_id TEXT")
                cur.execute(self._q("UPDATE schema_version SET version = ?"), (SCHEMA_VERSION,))
            # Databases created before the hourly rollup existed: build it once.
            cur.execute("SELECT 1 FROM readings_hourly LIMIT 1")
            if cur.fetchone() is None:
                h = ROLLUP_MS
                cur.execute(
                    "INSERT INTO readings_hourly (series_id, hour, n, total, lo, hi) "
                    f"SELECT series_id, CASE WHEN ts >= 0 THEN (ts / {h}) * {h} "
                    f"ELSE ((ts - {h} + 1) / {h}) * {h} END, count(*), sum(val), min(val), "
                    "max(val) FROM readings GROUP BY 1, 2"
                )
            if self.master_key is not None:
                self._adopt_master_key(cur, self.master_key)

    # -- the master key ------------------------------------------------------------------
    def _require_master_key(self) -> MasterKey:
        if self.master_key is None:
            raise no_master_key()
        return self.master_key

    def _adopt_master_key(self, cur: Any, mk: MasterKey) -> None:
        """Check ``mk`` against the database, then seal plaintext secrets (same transaction:
        a refused key writes nothing)."""
        q = self._q
        cur.execute("SELECT key_id, key_check FROM master_keys")
        checks = dict(cur.fetchall())
        cur.execute("SELECT DISTINCT secret_key_id FROM devices WHERE secret_key_id IS NOT NULL")
        used = {r[0] for r in cur.fetchall()}
        missing = sorted((used | set(checks)) - set(mk.ids))
        if missing:
            raise MasterKeyError(
                f"this database's device secrets are sealed with master key id(s) "
                f"{', '.join(missing)}, which the master key from {mk.source} (ids "
                f"{', '.join(mk.ids)}) does not have: wrong master key, or an old key line was "
                "removed before 'edgepipe-cloud master-key rotate' finished"
            )
        for kid, check in checks.items():
            if not mk.verify_check(kid, check):
                raise MasterKeyError(
                    f"master key {kid!r} from {mk.source} is not the key this database was "
                    "sealed with (its key check fails): wrong master key"
                )
        for kid in sorted(used - set(checks)):  # no key check (yet): try one of its rows
            cur.execute(
                q("SELECT name, secret FROM devices WHERE secret_key_id = ? LIMIT 1"), (kid,)
            )
            name, sealed = cur.fetchone()
            try:
                mk.open(name, kid, sealed)
            except SecretUnreadable:
                raise MasterKeyError(
                    f"master key {kid!r} from {mk.source} does not open the device secrets "
                    "sealed with that key id: wrong master key"
                ) from None
            cur.execute(
                q("INSERT INTO master_keys (key_id, key_check, created_ms) VALUES (?, ?, ?)"),
                (*mk.check_value(kid), now_ms()),
            )
        if mk.active_id not in checks and mk.active_id not in used:
            cur.execute(
                q(
                    "INSERT INTO master_keys (key_id, key_check, created_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (key_id) DO NOTHING"
                ),
                (*mk.check_value(), now_ms()),
            )
        cur.execute("SELECT id, name, secret FROM devices WHERE secret_key_id IS NULL")
        plain = cur.fetchall()
        for did, name, text in plain:
            if not _HEX_SECRET.fullmatch(text):
                raise CloudError(f"device {name!r}: stored secret is neither sealed nor hex")
            kid, sealed = mk.seal(name, bytes.fromhex(text))
            cur.execute(
                q(
                    "UPDATE devices SET secret = ?, secret_key_id = ? "
                    "WHERE id = ? AND secret_key_id IS NULL"
                ),
                (sealed, kid, did),
            )
        if plain:
            log.warning(
                "sealed %d plaintext device secret(s) with master key %r", len(plain), mk.active_id
            )

    def rewrap_secrets(self, batch: int = 200) -> int:
        mk = self._require_master_key()
        q = self._q
        done = 0
        while True:
            with self._write() as cur:
                active = mk.active_id
                cur.execute(
                    q(
                        "INSERT INTO master_keys (key_id, key_check, created_ms) VALUES (?, ?, ?) "
                        "ON CONFLICT (key_id) DO NOTHING"
                    ),
                    (*mk.check_value(active), now_ms()),
                )
                cur.execute(
                    q(
                        "SELECT id, name, secret, secret_key_id FROM devices WHERE "
                        "secret_key_id IS NOT NULL AND secret_key_id <> ? ORDER BY id LIMIT ?"
                    ),
                    (active, batch),
                )
                rows = cur.fetchall()
                for did, name, sealed, kid in rows:
                    secret = mk.open(name, kid, sealed)
                    new_kid, resealed = mk.seal(name, secret)
                    cur.execute(
                        q("UPDATE devices SET secret = ?, secret_key_id = ? WHERE id = ?"),
                        (resealed, new_kid, did),
                    )
                done += len(rows)
                if not rows:
                    cur.execute(
                        q(
                            "DELETE FROM master_keys WHERE key_id <> ? AND key_id NOT IN "
                            "(SELECT secret_key_id FROM devices WHERE secret_key_id IS NOT NULL)"
                        ),
                        (active,),
                    )
                    return done

    # -- devices -------------------------------------------------------------------------
    def add_device(self, name: str, secret: bytes) -> None:
        kid, sealed = self._require_master_key().seal(name, secret)
        with self._write() as cur:
            cur.execute(
                self._q(
                    "INSERT INTO devices (name, secret, secret_key_id, created_ms) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING"
                ),
                (name, sealed, kid, now_ms()),
            )
            if cur.rowcount != 1:
                raise DeviceExists(name)

    def remove_device(self, name: str) -> bool:
        with self._write() as cur:
            cur.execute(self._q("SELECT id FROM devices WHERE name = ?"), (name,))
            row = cur.fetchone()
            if row is None:
                return False
            did = row[0]
            # Explicit, child tables first (SQLite only cascades with foreign_keys=ON).
            cur.execute(
                self._q(
                    "DELETE FROM readings WHERE series_id IN "
                    "(SELECT id FROM series WHERE device_id = ?)"
                ),
                (did,),
            )
            cur.execute(
                self._q(
                    "DELETE FROM readings_hourly WHERE series_id IN "
                    "(SELECT id FROM series WHERE device_id = ?)"
                ),
                (did,),
            )
            for table in ("series", "batches", "nonces", "dead_letters", "device_daily"):
                cur.execute(self._q(f"DELETE FROM {table} WHERE device_id = ?"), (did,))
            cur.execute(self._q("DELETE FROM devices WHERE id = ?"), (did,))
        self._cache().pop(name, None)
        return True

    def _cache(self) -> dict[str, tuple[str, str, bytes]]:
        try:
            return self._secret_cache
        except AttributeError:
            self._secret_cache = {}
            return self._secret_cache

    def get_device_secret(self, name: str) -> bytes | None:
        mk = self._require_master_key()
        with self._read() as cur:
            cur.execute(
                self._q("SELECT secret_key_id, secret FROM devices WHERE name = ?"), (name,)
            )
            row = cur.fetchone()
        if row is None:
            return None
        kid, sealed = row
        if kid is None:  # only a process without the master key can have written it
            raise SecretUnreadable(
                name, None, "it is stored in plaintext; restart the receiver to seal it"
            )
        cache = self._cache()
        hit = cache.get(name)
        if hit is not None and hit[0] == kid and hit[1] == sealed:
            return hit[2]
        secret = mk.open(name, kid, sealed)
        if len(cache) >= 100_000:
            cache.clear()
        cache[name] = (kid, sealed, secret)
        return secret

    _DEVICE_COLS = (
        "d.name, d.created_ms, d.last_seen_ms, d.last_sync_ms, d.last_link, d.last_seq, "
        "d.status, d.last_error, d.last_error_ms, dd.readings, dd.bytes, dd.uploads"
    )

    def _device_sql(self, where: str) -> str:
        return self._q(
            f"SELECT {self._DEVICE_COLS} FROM devices d "
            "LEFT JOIN device_daily dd ON dd.device_id = d.id AND dd.day = ? "
            f"{where} ORDER BY d.name"
        )

    @staticmethod
    def _device_row(r: Sequence[Any]) -> dict[str, Any]:
        return {
            "name": r[0],
            "created_ms": r[1],
            "last_seen_ms": r[2],
            "last_sync_ms": r[3],
            "link": r[4],
            "last_seq": r[5],
            "reported": json.loads(r[6]) if r[6] else None,
            "last_error": r[7],
            "last_error_ms": r[8],
            "today": {"readings": r[9] or 0, "bytes": r[10] or 0, "uploads": r[11] or 0},
        }

    def list_devices(self) -> list[dict[str, Any]]:
        with self._read() as cur:
            cur.execute(self._device_sql(""), (utc_day(now_ms()),))
            return [self._device_row(r) for r in cur.fetchall()]

    def get_device(self, name: str) -> dict[str, Any] | None:
        with self._read() as cur:
            cur.execute(self._device_sql("WHERE d.name = ?"), (utc_day(now_ms()), name))
            row = cur.fetchone()
        return self._device_row(row) if row else None

    def _device_id(self, cur: Any, name: str, lock: bool = False) -> int:
        lock_sql = f" {self.LOCK_ROW}" if lock and self.LOCK_ROW else ""
        cur.execute(self._q(f"SELECT id FROM devices WHERE name = ?{lock_sql}"), (name,))
        row = cur.fetchone()
        if row is None:
            raise UnknownDevice(name)
        return row[0]

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
                raise Rejected(401, "replay", "this nonce was already used")

            # Decide every batch before writing any: a conflict anywhere refuses the request.
            stored: dict[int, str] = {}
            seqs = sorted({b.seq for b in upload.batches})
            for part in _chunks(seqs, 500):
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
            for b in new:
                local = []
                for source, metric, tags in b.series:
                    key = (source, metric, _tags_text(tags))
                    sid = series_ids.get(key)
                    if sid is None:
                        sid = series_ids[key] = self._series_id(cur, did, key)
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
            [(sid, hour, len(v), sum(v), min(v), max(v)) for (sid, hour), v in groups.items()],
        )

    def _series_id(self, cur: Any, did: int, key: tuple[str, str, str]) -> int:
        q = self._q
        cur.execute(
            q(
                "SELECT id FROM series WHERE device_id = ? AND source = ? AND metric = ? AND tags = ?"
            ),
            (did, *key),
        )
        row = cur.fetchone()
        if row is None:
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

    @staticmethod
    def _log_filter(
        device_col: str, order_col: str, device: str | None, before: int | None
    ) -> tuple[str, list[Any]]:
        clauses, args = [], []
        if device is not None:
            clauses.append(f"{device_col} = ?")
            args.append(device)
        if before is not None:
            clauses.append(f"{order_col} < ?")
            args.append(before)
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), args

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
                    "tags": _tags_obj(r[2]),
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
        since = q.since if q.since is not None else until - 24 * 3600 * 1000
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
                        "tags": _tags_obj(r[2]),
                        "ts": r[3],
                        "value": r[4],
                        "flags": r[5],
                    }
                    for r in rows[:limit]
                ]
            else:
                step = int(step)
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
                        "tags": _tags_obj(r[3]),
                        "ts": int(r[0]),
                        "avg": float(r[4]),
                        "min": float(r[5]),
                        "max": float(r[6]),
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

    # -- operators and sessions ------------------------------------------------------------
    def add_operator(self, name: str, pwhash: str) -> None:
        with self._write() as cur:
            cur.execute(
                self._q(
                    "INSERT INTO operators (name, pwhash, created_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO NOTHING"
                ),
                (name, pwhash, now_ms()),
            )
            if cur.rowcount != 1:
                raise OperatorExists(name)

    def operator_hash(self, name: str) -> str | None:
        with self._read() as cur:
            cur.execute(self._q("SELECT pwhash FROM operators WHERE name = ?"), (name,))
            row = cur.fetchone()
        return row[0] if row else None

    def set_operator_hash(self, name: str, pwhash: str) -> bool:
        with self._write() as cur:
            cur.execute(self._q("UPDATE operators SET pwhash = ? WHERE name = ?"), (pwhash, name))
            return cur.rowcount == 1

    def remove_operator(self, name: str) -> bool:
        with self._write() as cur:
            cur.execute(
                self._q(
                    "DELETE FROM sessions WHERE operator_id IN "
                    "(SELECT id FROM operators WHERE name = ?)"
                ),
                (name,),
            )
            cur.execute(self._q("DELETE FROM operators WHERE name = ?"), (name,))
            return cur.rowcount == 1

    def list_operators(self) -> list[dict[str, Any]]:
        with self._read() as cur:
            cur.execute("SELECT name, created_ms FROM operators ORDER BY name")
            return [{"name": r[0], "created_ms": r[1]} for r in cur.fetchall()]

    def create_session(self, key: str, operator: str, csrf: str, now: int, expires: int) -> None:
        with self._write() as cur:
            cur.execute(self._q("DELETE FROM sessions WHERE expires_ms < ?"), (now,))
            cur.execute(
                self._q(
                    "INSERT INTO sessions (key, operator_id, csrf, created_ms, expires_ms) "
                    "SELECT ?, id, ?, ?, ? FROM operators WHERE name = ?"
                ),
                (key, csrf, now, expires, operator),
            )
            if cur.rowcount != 1:
                raise CloudError(f"no operator named {operator!r}")

    def get_session(self, key: str, now: int) -> dict[str, Any] | None:
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT o.name, s.csrf, s.expires_ms FROM sessions s "
                    "JOIN operators o ON o.id = s.operator_id WHERE s.key = ? AND s.expires_ms > ?"
                ),
                (key, now),
            )
            row = cur.fetchone()
        return {"operator": row[0], "csrf": row[1], "expires_ms": row[2]} if row else None

    def delete_session(self, key: str) -> bool:
        with self._write() as cur:
            cur.execute(self._q("DELETE FROM sessions WHERE key = ?"), (key,))
            return cur.rowcount == 1
