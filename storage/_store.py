"""The encrypted local store: SQLite (WAL) through aiosqlite, one transaction per batch.

Durability: the MQTT acknowledgement follows the commit, so a commit must survive power
loss.  In WAL mode ``synchronous=NORMAL`` may lose the last transactions on power loss
(the database stays consistent, but acked readings would be gone), so edgepipe runs
``synchronous=FULL``: one fsync of the WAL per commit, i.e. per batch, not per reading.
``bench/store.py`` measures what that costs against NORMAL.

Each commit runs as one function on aiosqlite's worker thread (sealing included), so the
event loop keeps reading MQTT while SQLite writes and fsyncs.

Capacity: before each commit the store checks its quota (bytes of live pages).  Over it, it
first evicts the oldest *synced* batches, then applies ``on_full`` to unsynced data:
``drop_oldest`` drops the oldest unsynced batches (counted and logged), ``backpressure``
raises :class:`StoreFullError` and nothing is written.  Eviction goes down to a low-water
mark (90 % of the quota) so it runs in rounds, not on every commit; each round ends with an
incremental vacuum and a truncating WAL checkpoint, so freed space returns to the
filesystem and no old WAL frame of a deleted row lingers.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import aiosqlite
import msgpack

from core._errors import KeyError_, StoreError, StoreFullError, TamperedError
from core._metrics import METRICS
from core._model import Batch, DeadLetter, Reading, SeriesKey, SeriesRegistry
from protocol._keys import KEY_REFUSE_AT, KEY_WARN_AT, Keyring, Sealer

__all__ = ["SCHEMA_VERSION", "Store", "StoredBatch"]

log = logging.getLogger("edgepipe.store")
T = TypeVar("T")

_committed = METRICS.counter("edgepipe_store_batches_total", "batches committed to the store")
_stored = METRICS.counter("edgepipe_readings_stored_total", "readings durably stored")
_dropped = METRICS.counter(
    "edgepipe_readings_dropped_total",
    "Readings dropped, by stage and reason (filtered, aggregated, dead_letter; stage store: quota)",
    ["stage", "reason"],
)
_dl_dropped = METRICS.counter(
    "edgepipe_dead_letters_dropped_total", "dead letters evicted to stay within the quota"
)
_evicted = METRICS.counter(
    "edgepipe_store_evicted_batches_total", "batches evicted to stay within the quota", ["synced"]
)
_written = METRICS.counter(
    "edgepipe_store_bytes_written_total",
    "bytes SQLite wrote to the filesystem (WAL frames, checkpoints, vacuum): flash wear",
)
_per_reading = METRICS.gauge(
    "edgepipe_store_bytes_written_per_reading", "bytes written per stored reading (since start)"
)
_key_seals = METRICS.gauge(
    "edgepipe_store_key_seals", "encryptions made with the active store key (rotate before 2**30)"
)

#: The SQL schema version (``PRAGMA user_version``); migrations below go forward only.
SCHEMA_VERSION = 2

#: Tables whose rows are sealed: (table, primary key column).
_SEALED = (
    ("secrets", "name"),
    ("series", "id"),
    ("filter_state", "id"),
    ("dead_letters", "seq"),
    ("batches", "seq"),
)

_V1 = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY, key_id TEXT NOT NULL, blob BLOB NOT NULL,
    n INTEGER NOT NULL, t_min INTEGER, t_max INTEGER, synced INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS batches_unsynced ON batches(synced, seq);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, key_id TEXT NOT NULL, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY, key_id TEXT NOT NULL, blob BLOB NOT NULL,
    synced INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS filter_state (
    stage TEXT PRIMARY KEY, key_id TEXT NOT NULL, blob BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (
    id BLOB PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
"""


def _migrate_v1(store: Store, con: sqlite3.Connection) -> None:
    for stmt in _V1.split(";"):
        if stmt.strip():
            con.execute(stmt)


def _migrate_v2(store: Store, con: sqlite3.Connection) -> None:
    """v2: stage names no longer in clear, sealed store secrets (message identity key),
    persistent sequence counters (eviction must never make a seq come back), message
    identities as an append-only log."""
    s = store.sealer
    con.execute(
        "CREATE TABLE secrets (name TEXT PRIMARY KEY, key_id TEXT NOT NULL, blob BLOB NOT NULL)"
        " WITHOUT ROWID"
    )
    # v1 derived message identities from the active key: keep the same key so redeliveries
    # of messages stored before the upgrade are still recognised.
    ident = s.keyring.derive("message-identity")
    kid, blob = s.seal("secrets", "identity", ident)
    con.execute("INSERT INTO secrets VALUES ('identity', ?, ?)", (kid, blob))
    store._uses_pending += 1
    con.execute(
        "CREATE TABLE filter_state2 (id BLOB PRIMARY KEY, key_id TEXT NOT NULL, "
        "blob BLOB NOT NULL) WITHOUT ROWID"
    )
    for stage, kid, blob in con.execute("SELECT stage, key_id, blob FROM filter_state").fetchall():
        plain = s.open("filter_state", stage, kid, blob)
        hid = _stage_id(ident, stage)
        kid, blob = s.seal("filter_state", hid.hex(), msgpack.packb([stage, plain]))
        con.execute("INSERT INTO filter_state2 VALUES (?, ?, ?)", (hid, kid, blob))
        store._uses_pending += 1
    con.execute("DROP TABLE filter_state")
    con.execute("ALTER TABLE filter_state2 RENAME TO filter_state")
    for k, q in (
        ("last_seq", "SELECT coalesce(max(seq), 0) FROM batches"),
        ("last_dl_seq", "SELECT coalesce(max(seq), 0) FROM dead_letters"),
    ):
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, con.execute(q).fetchone()[0]))
    con.execute("INSERT OR REPLACE INTO meta VALUES ('evicted', 0)")
    for kid in s.keyring.ids:  # the device id in clear gives way to a MAC per key
        con.execute(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"dev:{kid}", store._device_mac(kid))
        )
    # key check values become MACs (checked against schema 1's form before migrating)
    con.execute("DELETE FROM meta WHERE k LIKE 'kcv:%'")
    con.execute("DELETE FROM meta WHERE k='device'")
    # message identities: one appended row per commit (sequential writes; a keyed-hash
    # index of random ids dirtied a dozen pages per commit), the newest SEEN_KEEP kept
    con.execute("CREATE TABLE seen2 (n INTEGER PRIMARY KEY, ids BLOB NOT NULL)")
    ids = [r[0] for r in con.execute("SELECT id FROM seen ORDER BY seq")]
    for i in range(0, len(ids), 512):
        con.execute("INSERT INTO seen2 (ids) VALUES (?)", (msgpack.packb(ids[i : i + 512]),))
    con.execute("DROP TABLE seen")
    con.execute("ALTER TABLE seen2 RENAME TO seen")


_MIGRATIONS: list[Callable[[Store, sqlite3.Connection], None]] = [_migrate_v1, _migrate_v2]
assert len(_MIGRATIONS) == SCHEMA_VERSION


def _stage_id(ident: bytes, stage: str) -> bytes:
    return hashlib.blake2b(
        stage.encode(), key=ident, person=b"edgepipe-stage", digest_size=16
    ).digest()


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_zstd: list[Any] = []


def _codec() -> tuple[Any, Any]:
    if not _zstd:
        import zstandard

        _zstd[:] = [zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()]
    return _zstd[0], _zstd[1]


def _pack_batch(batch: Batch) -> bytes:
    """A batch's sealed plaintext: msgpack of its columns, zstd-compressed when larger than
    a few hundred bytes (a zstd frame never starts like a msgpack array, so both forms read
    back; rows written before compression stay readable)."""
    plain = msgpack.packb([batch.series, batch.ts, batch.value, batch.flags])
    if len(plain) < 512:
        return plain
    packed = _codec()[0].compress(plain)
    return packed if len(packed) < len(plain) else plain


def _unpack_batch(plain: bytes, seq: int) -> list[Any]:
    if plain[:4] == _ZSTD_MAGIC:
        # authenticated already; the bound only guards against a bug, not an attacker
        plain = _codec()[1].decompress(plain, max_output_size=64 << 20)
    cols = msgpack.unpackb(plain)
    if not (isinstance(cols, list) and len(cols) == 4):
        raise TamperedError(f"batches row {seq}: not a batch", table="batches", seq=seq)
    return cols


def _aad_row(v: Any) -> int | str:
    return v.hex() if isinstance(v, bytes) else v


def _is_full(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None) or 0
    if code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        return True
    msg = str(e).lower()
    return "full" in msg or "disk i/o" in msg or "no space" in msg


class _ThreadIO:
    """Bytes this thread passed to write(2): SQLite's writes, read on its worker thread."""

    def __init__(self) -> None:
        self._fd: int | None = None
        try:
            self._fd = os.open("/proc/thread-self/io", os.O_RDONLY)
        except OSError:
            pass

    def wchar(self) -> int:
        if self._fd is None:
            return 0
        data = os.pread(self._fd, 512, 0)
        for line in data.split(b"\n"):
            if line.startswith(b"wchar:"):
                return int(line.split()[1])
        return 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StoredBatch(NamedTuple):
    seq: int
    batch: Batch


class Store:
    """The local store.  ``async with await Store.open(...) as store: ...``."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        sealer: Sealer,
        registry: SeriesRegistry,
        max_bytes: int,
        on_full: str = "backpressure",
    ) -> None:
        if on_full not in ("backpressure", "drop_oldest"):
            raise ValueError(f"on_full must be 'backpressure' or 'drop_oldest', not {on_full!r}")
        self._db = db
        self.path = path
        self.sealer = sealer
        self.registry = registry
        self.max_bytes = max_bytes
        self.on_full = on_full
        self._closed = False
        self.last_seq = 0
        self.schema_version = 0
        self.identity_key = b""
        self._key_uses: dict[str, int] = {}
        self._uses_pending = 0
        self._io: _ThreadIO | None = None
        self.bytes_written = 0
        self._readings = 0
        # (seen row, monotonic time) of the identities this process committed
        self._seen_rows: collections.deque[tuple[int, float]] = collections.deque()
        self._opened_at = time.monotonic()
        self._first_seen_row: int | None = None

    # -- opening ----------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        path: str | Path,
        keyring: Keyring,
        *,
        device_id: str,
        quota_bytes: int = 1 << 30,
        on_full: str = "backpressure",
        synchronous: str = "FULL",
        create: bool = True,
    ) -> Store:
        """Open (or create) the store at ``path``.  ``create=False`` refuses a missing file
        (readers such as ``export`` and ``status`` must not make an empty store)."""
        path = Path(path)
        if not create and not path.exists():
            raise StoreError(f"{path}: no store there (has the pipeline run yet?)")
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            store = cls(
                db, path, Sealer(keyring, device_id), SeriesRegistry(), quota_bytes, on_full
            )
            await store._run(store._init_sync, synchronous)
        except BaseException:
            await db.close()
            raise
        return store

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # One call runs ``fn`` on aiosqlite's worker thread with the raw sqlite3
        # connection: a whole transaction per hop instead of one hop per statement.
        if self._closed:
            raise StoreError("the store is closed")
        db = self._db

        def call() -> T:
            try:
                return fn(db._conn, *args)
            except sqlite3.DatabaseError as e:
                con = db._conn
                if con.in_transaction:
                    try:
                        con.rollback()
                    except sqlite3.Error:
                        pass
                if _is_full(e):
                    raise StoreFullError(f"{self.path}: disk full or write error: {e}") from None
                raise StoreError(f"{self.path}: damaged or not an edgepipe store: {e}") from None

        return await db._execute(call)

    def _init_sync(self, con: sqlite3.Connection, synchronous: str) -> None:
        self._io = _ThreadIO()
        con.execute("PRAGMA busy_timeout=10000")
        if con.execute("PRAGMA page_count").fetchone()[0] == 0:  # a new file (setting it
            con.execute("PRAGMA auto_vacuum=INCREMENTAL")  # on an old one writes the header)
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: cannot enable WAL mode (got {mode})")
        con.execute(f"PRAGMA synchronous={synchronous}")
        con.execute("PRAGMA secure_delete=ON")  # deleted rows are zeroed, not left behind
        con.execute("PRAGMA journal_size_limit=4194304")  # WAL shrinks back after checkpoints
        con.execute("PRAGMA foreign_keys=ON")
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by a newer edgepipe (schema {version}, this one knows "
                f"{SCHEMA_VERSION}); refusing to open"
            )
        if version > 0:  # an existing store: check the keys and device before any change
            self._check_keys(con, version)
            self._check_device(con)
        migrated = version < SCHEMA_VERSION
        for v in range(version, SCHEMA_VERSION):
            con.execute("BEGIN IMMEDIATE")
            try:
                _MIGRATIONS[v](self, con)
                con.execute(f"PRAGMA user_version={v + 1}")
                self._flush_uses(con)
                con.execute("COMMIT")
            except BaseException:
                self._abort(con)
                raise
            if version > 0:
                log.info("%s: migrated the store schema to version %d", self.path, v + 1)
        self.schema_version = SCHEMA_VERSION
        if self._new_kcv(con):  # a new store, or keys added to the keyring
            con.execute("BEGIN IMMEDIATE")
            self._check_keys(con, SCHEMA_VERSION)
            con.execute("COMMIT")
        if migrated and version > 0:
            self._reclaim(con)  # old-format pages zeroed and out of the WAL
        (row,) = con.execute("SELECT key_id, blob FROM secrets WHERE name='identity'")
        self.identity_key = self.sealer.open("secrets", "identity", row[0], row[1])
        self._load_series(con)
        self.last_seq = self._meta(con, "last_seq", 0)
        for k, v in con.execute("SELECT k, v FROM meta WHERE k LIKE 'uses:%'"):
            self._key_uses[k[5:]] = v
        _key_seals.set(self._key_uses.get(self.sealer.keyring.active_id, 0))

    @staticmethod
    def _meta(con: sqlite3.Connection, k: str, default: Any = None) -> Any:
        row = con.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return default if row is None else row[0]

    def _kcv(self, kid: str) -> bytes:
        """A key check value: a MAC of a constant, independent of the device."""
        return hashlib.blake2b(
            b"edgepipe key check", key=self.sealer.keyring.key(kid), person=b"edgepipe-kcv"
        ).digest()

    def _kcv_ok(self, kid: str, value: bytes, version: int) -> bool:
        if version >= 2:
            return hmac.compare_digest(value, self._kcv(kid))
        s = self.sealer  # schema 1: a fixed-nonce AES-GCM encryption of a constant
        try:
            s._aead[kid].decrypt(b"\0" * 12, value, s._aad("meta", "kcv", kid))
            return True
        except Exception:
            return False

    def _device_mac(self, kid: str) -> bytes:
        # the device id is not stored in clear: a MAC of it under each key
        return hashlib.blake2b(
            self.sealer.device, key=self.sealer.keyring.key(kid), person=b"edgepipe-device"
        ).digest()

    def _check_device(self, con: sqlite3.Connection) -> None:
        device = self.sealer.device.decode()
        row = con.execute("SELECT v FROM meta WHERE k='device'").fetchone()  # schema 1
        if row is not None and row[0] != device:
            raise StoreError(
                f"{self.path} belongs to device {row[0]!r}, not {device!r}; refusing to mix"
            )
        for kid in self.sealer.keyring.ids:
            mac = self._meta(con, f"dev:{kid}")
            if mac is not None and mac != self._device_mac(kid):
                raise StoreError(
                    f"{self.path} belongs to another device, not {device!r}; refusing to mix"
                )

    def _new_kcv(self, con: sqlite3.Connection) -> bool:
        have = {r[0] for r in con.execute("SELECT k FROM meta WHERE k LIKE 'kcv:%'")}
        return any(f"kcv:{k}" not in have for k in self.sealer.keyring.ids)

    def _check_keys(self, con: sqlite3.Connection, version: int) -> None:
        """A check value per key id: a wrong key is a clear error, not 'tampered data'.
        Raises before anything is written, so a wrong keyring never changes the file."""
        s = self.sealer
        new = []
        for kid in s.keyring.ids:
            row = con.execute("SELECT v FROM meta WHERE k=?", (f"kcv:{kid}",)).fetchone()
            if row is None:
                new.append(kid)
                continue
            if not self._kcv_ok(kid, row[0], version):
                raise KeyError_(
                    f"the key with id {kid!r} from {s.keyring.source} is not the key this "
                    f"store was written with; nothing was changed"
                ) from None
        used: set[str] = set()
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, _pk in _SEALED:
            if table in tables:
                used |= {r[0] for r in con.execute(f"SELECT DISTINCT key_id FROM {table}")}
        missing = used - set(s.keyring.ids)
        if missing:
            raise KeyError_(
                f"the store has rows written with key id(s) {sorted(missing)} that are not in "
                f"the keyring from {s.keyring.source}; nothing was changed"
            )
        if new and con.in_transaction:
            for kid in new:
                con.execute("INSERT INTO meta VALUES (?, ?)", (f"kcv:{kid}", self._kcv(kid)))
                con.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    (f"dev:{kid}", self._device_mac(kid)),
                )

    def _load_series(self, con: sqlite3.Connection) -> None:
        keys = list(self.registry._keys) if self.registry is not None else []
        for sid, kid, blob in con.execute(
            "SELECT id, key_id, blob FROM series WHERE id >= ? ORDER BY id", (len(keys),)
        ):
            if sid != len(keys):
                raise TamperedError(
                    f"{self.path}: series table has a gap at id {len(keys)}", table="series"
                )
            d, m, t = msgpack.unpackb(self.sealer.open("series", sid, kid, blob))
            keys.append(SeriesKey(d, m, tuple(tuple(x) for x in t)))
        self.registry = SeriesRegistry(keys)

    def _flush_uses(self, con: sqlite3.Connection) -> int:
        """Add the encryptions made in this transaction to the active key's counter."""
        kid = self.sealer.keyring.active_id
        n, self._uses_pending = self._uses_pending, 0
        if not n:
            return self._key_uses.get(kid, 0)
        row = con.execute("SELECT v FROM meta WHERE k=?", (f"uses:{kid}",)).fetchone()
        uses = (row[0] if row else 0) + n
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"uses:{kid}", uses))
        self._key_uses[kid] = uses
        if uses >= KEY_WARN_AT and uses - n < KEY_WARN_AT:
            log.warning(
                "key %r has sealed %d rows: rotate it soon (edgepipe keys rotate)", kid, uses
            )
        return uses

    def _abort(self, con: sqlite3.Connection) -> None:
        self._uses_pending = 0
        if con.in_transaction:
            con.rollback()

    def _seal(self, table: str, row: int | str, plain: bytes) -> tuple[str, bytes]:
        self._uses_pending += 1
        return self.sealer.seal(table, row, plain)

    # -- writing ----------------------------------------------------------------------
    async def seen(self, keys: list[bytes]) -> set[bytes]:
        """Which of these message identities are already committed (those of the last
        :attr:`SEEN_KEEP` commits and :attr:`SEEN_WINDOW_S` seconds are kept).  Only
        messages that may be redeliveries are looked up, so this scan is rare."""
        if not keys:
            return set()
        want = set(keys)

        def q(con: sqlite3.Connection) -> set[bytes]:
            out: set[bytes] = set()
            for (ids,) in con.execute("SELECT ids FROM seen ORDER BY n DESC"):
                out.update(want.intersection(msgpack.unpackb(ids)))
                if len(out) == len(want):
                    break
            return out

        return await self._run(q)

    async def commit(
        self,
        batch: Batch,
        dead_letters: Iterable[DeadLetter] = (),
        keys: Iterable[bytes] = (),
        states: dict[str, bytes] | None = None,
    ) -> int | None:
        """Durably store one batch with its dead letters, message identities and filter
        state, in one transaction.  Returns the batch's sequence number (None if it held no
        readings).  Raises StoreFullError (nothing written) when the disk or quota is full."""
        new_series = self.registry.uncommitted()
        dead = list(dead_letters)
        keys = list(keys)
        n_series = len(self.registry)
        seq = await self._run(self._commit_sync, batch, dead, keys, states or {}, new_series)
        self.registry.mark_committed(n_series)
        if seq is not None:
            self.last_seq = seq
            _committed.inc()
            _stored.inc(len(batch))
        return seq

    #: message identities are kept for at least this many commits and this many seconds.
    #: An edgepipe crash only leaves the batch in hand unacknowledged, but a broker that
    #: crashes restores its last autosave and resends what was acknowledged since then:
    #: the window must cover the broker's ``autosave_interval`` (docs/broker.md).
    SEEN_KEEP = 256
    SEEN_WINDOW_S = 120.0
    #: ... and at least this many when the quota is reached
    SEEN_MIN_KEEP = 16

    def _commit_sync(
        self,
        con: sqlite3.Connection,
        batch: Batch,
        dead: list[DeadLetter],
        keys: list[bytes],
        states: dict[str, bytes],
        new_series: list[tuple[int, SeriesKey]],
    ) -> int | None:
        io = self._io.wchar() if self._io else 0
        kid_active = self.sealer.keyring.active_id
        uses = self._key_uses.get(kid_active, 0)
        if uses >= KEY_REFUSE_AT:
            raise StoreError(
                f"key {kid_active!r} has sealed {uses} rows; rotate it (edgepipe keys rotate)"
            )
        self._uses_pending = 0
        evicted = False
        try:
            con.execute("BEGIN IMMEDIATE")
            seq = None
            plain = b""
            if len(batch):
                plain = _pack_batch(batch)
            need = len(plain) + 64 * len(keys) + sum(len(d.payload) + 200 for d in dead) + 512
            evicted = self._make_room(con, need)
            seal = self._seal
            for sid, key in new_series:
                kid, blob = seal("series", sid, msgpack.packb([key.device, key.metric, key.tags]))
                con.execute("INSERT INTO series VALUES (?, ?, ?)", (sid, kid, blob))
            last_seq = self._meta(con, "last_seq", 0)
            if len(batch):
                seq = last_seq = last_seq + 1
                kid, blob = seal("batches", seq, plain)
                con.execute(
                    "INSERT INTO batches (seq, key_id, blob, n, t_min, t_max) VALUES (?,?,?,?,?,?)",
                    (seq, kid, blob, len(batch), min(batch.ts), max(batch.ts)),
                )
                con.execute("UPDATE meta SET v=? WHERE k='last_seq'", (seq,))
            if dead:
                dseq = self._meta(con, "last_dl_seq", 0)
                for d in dead:
                    dseq += 1
                    kid, blob = seal("dead_letters", dseq, msgpack.packb(list(d)))
                    con.execute(
                        "INSERT INTO dead_letters (seq, key_id, blob) VALUES (?,?,?)",
                        (dseq, kid, blob),
                    )
                con.execute("UPDATE meta SET v=? WHERE k='last_dl_seq'", (dseq,))
            if keys:
                n = con.execute("INSERT INTO seen (ids) VALUES (?)", (msgpack.packb(keys),))
                self._note_seen_row(con, n.lastrowid)
            for stage, blob_plain in states.items():
                hid = _stage_id(self.identity_key, stage)
                kid, blob = seal("filter_state", hid.hex(), msgpack.packb([stage, blob_plain]))
                con.execute(
                    "INSERT OR REPLACE INTO filter_state VALUES (?, ?, ?)", (hid, kid, blob)
                )
            uses = self._flush_uses(con)
            con.execute("COMMIT")
        except BaseException:
            self._abort(con)
            raise
        if evicted:
            self._reclaim(con)
        _key_seals.set(uses)
        if self._io:
            self.bytes_written += self._io.wchar() - io
            _written.inc(self._io.wchar() - io)
            self._readings += len(batch)
            if self._readings:
                _per_reading.set(self.bytes_written / self._readings)
        return seq

    def _used_bytes(self, con: sqlite3.Connection) -> int:
        page = con.execute("PRAGMA page_size").fetchone()[0]
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        free = con.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * page

    def _note_seen_row(self, con: sqlite3.Connection, row: int) -> None:
        """Forget identities older than both SEEN_KEEP commits and SEEN_WINDOW_S seconds."""
        now = time.monotonic()
        rows = self._seen_rows
        rows.append((row, now))
        if self._first_seen_row is None:
            self._first_seen_row = row
        if row % 64:
            return
        horizon = now - self.SEEN_WINDOW_S
        cut = 0
        while rows and rows[0][1] < horizon:
            cut = rows.popleft()[0]
        if not cut and self._opened_at < horizon:
            cut = self._first_seen_row - 1  # rows of earlier processes are old enough now
        cut = min(cut, row - self.SEEN_KEEP)
        if cut > 0:
            con.execute("DELETE FROM seen WHERE n <= ?", (cut,))

    def _make_room(self, con: sqlite3.Connection, need: int) -> bool:
        """Inside the commit's transaction: keep live pages + ``need`` within the quota.
        Returns whether anything was evicted.  Raises StoreFullError (backpressure)."""
        used = self._used_bytes(con)
        if used + need <= self.max_bytes:
            return False
        target = int(self.max_bytes * 0.9) - need  # low-water mark: evict in rounds
        # message identities first: only the newest few commits can see redeliveries
        con.execute(
            "DELETE FROM seen WHERE n <= (SELECT max(n) FROM seen) - ?", (self.SEEN_MIN_KEEP,)
        )
        evicted = True
        used = self._used_bytes(con)
        for synced in (1, 0):
            if synced == 0 and self.on_full != "drop_oldest":
                break
            while used > target:
                rows = con.execute(
                    "SELECT seq, n, length(blob) FROM batches WHERE synced=? ORDER BY seq "
                    "LIMIT 256",
                    (synced,),
                ).fetchall()
                if not rows:
                    break
                freed, upto, readings, count = 0, 0, 0, 0
                for seq, n, size in rows:
                    freed += size + 80
                    upto, readings, count = seq, readings + n, count + 1
                    if used - freed <= target:
                        break
                con.execute("DELETE FROM batches WHERE synced=? AND seq<=?", (synced, upto))
                con.execute("UPDATE meta SET v=v+? WHERE k='evicted'", (count,))
                evicted = True
                _evicted.inc(count, str(synced))
                if not synced:
                    _dropped.inc(readings, "store", "quota")
                    log.warning(
                        "store quota reached: dropped %d unsynced batch(es), %d reading(s), "
                        "up to seq %d (on_full: drop_oldest)",
                        count,
                        readings,
                        upto,
                    )
                used = self._used_bytes(con)
            if used <= target:
                break
        if used > target and self.on_full == "drop_oldest":
            # readings are gone: dead letters are what is left to give way
            while used > target:
                rows = con.execute("SELECT seq FROM dead_letters ORDER BY seq LIMIT 64").fetchall()
                if not rows:
                    break
                con.execute("DELETE FROM dead_letters WHERE seq<=?", (rows[-1][0],))
                _dl_dropped.inc(len(rows))
                evicted = True
                used = self._used_bytes(con)
        if used + need > self.max_bytes:
            why = (
                "nothing is left to evict"
                if self.on_full == "drop_oldest"
                else "unsynced data is kept (on_full: backpressure)"
            )
            raise StoreFullError(
                f"store quota of {self.max_bytes} bytes reached ({used} in use, "
                f"{need} more needed); {why}"
            )
        return evicted

    def _reclaim(self, con: sqlite3.Connection) -> None:
        """Return freed pages to the filesystem and leave no old WAL frame behind."""
        try:
            con.execute("PRAGMA incremental_vacuum").fetchall()
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as e:  # a reader holding the WAL: next round truncates
            log.debug("reclaim deferred: %s", e)

    async def checkpoint(self) -> tuple[int, int, int]:
        """A truncating WAL checkpoint: (busy, WAL frames, frames checkpointed)."""
        return await self._run(
            lambda con: tuple(con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
        )

    async def mark_synced(self, seqs: Iterable[int]) -> None:
        await self._mark_synced("batches", seqs)

    async def _mark_synced(self, table: str, seqs: Iterable[int]) -> None:
        rows = [(s,) for s in seqs]
        if not rows:
            return

        def q(con: sqlite3.Connection) -> None:
            con.execute("BEGIN")
            con.executemany(f"UPDATE {table} SET synced=1 WHERE seq=?", rows)
            con.execute("COMMIT")

        await self._run(q)

    # -- key rotation ------------------------------------------------------------------
    async def rows_by_key(self) -> dict[str, int]:
        """How many sealed rows each key id holds (re-encryption progress)."""

        def q(con: sqlite3.Connection) -> dict[str, int]:
            out: dict[str, int] = {}
            for table, _pk in _SEALED:
                for kid, n in con.execute(f"SELECT key_id, count(*) FROM {table} GROUP BY key_id"):
                    out[kid] = out.get(kid, 0) + n
            return out

        return await self._run(q)

    async def reencrypt_in_background(self, pause: float = 0.02) -> None:
        """The running pipeline's re-encryption task: never raises, logs instead."""
        try:
            if any(k != self.sealer.keyring.active_id for k in await self.rows_by_key()):
                log.info("rows under older keys found: re-encrypting in the background")
                await self.reencrypt(pause=pause)
        except StoreError as e:
            log.error("background re-encryption stopped: %s", e)

    async def reencrypt(
        self,
        chunk: int = 64,
        progress: Callable[[int, int], None] | None = None,
        pause: float = 0.0,
    ) -> int:
        """Re-seal every row not under the active key, ``chunk`` rows per transaction, so a
        kill at any point loses nothing and the next run resumes.  Returns rows re-sealed.
        ``pause`` seconds between chunks leave the disk to the pipeline's commits."""
        active = self.sealer.keyring.active_id
        total = sum(n for k, n in (await self.rows_by_key()).items() if k != active)
        done = 0
        for table, pk in _SEALED:
            while True:
                n = await self._run(self._reseal_chunk, table, pk, chunk)
                if not n:
                    break
                done += n
                if progress is not None:
                    progress(done, total)
                if pause:
                    await asyncio.sleep(pause)
        if done:
            await self._run(self._reclaim)
            log.info("re-encrypted %d row(s) under key %r", done, active)
        return done

    def _reseal_chunk(self, con: sqlite3.Connection, table: str, pk: str, chunk: int) -> int:
        active = self.sealer.keyring.active_id
        self._uses_pending = 0
        try:
            con.execute("BEGIN IMMEDIATE")
            rows = con.execute(
                f"SELECT {pk}, key_id, blob FROM {table} WHERE key_id != ? LIMIT ?",
                (active, chunk),
            ).fetchall()
            for rid, kid, blob in rows:
                plain = self.sealer.open(table, _aad_row(rid), kid, blob)
                kid, blob = self._seal(table, _aad_row(rid), plain)
                con.execute(f"UPDATE {table} SET key_id=?, blob=? WHERE {pk}=?", (kid, blob, rid))
            self._flush_uses(con)
            con.execute("COMMIT")
        except BaseException:
            self._abort(con)
            raise
        return len(rows)

    # -- reading ----------------------------------------------------------------------
    async def load_states(self) -> dict[str, bytes]:
        def q(con: sqlite3.Connection) -> dict[str, bytes]:
            out = {}
            for hid, kid, blob in con.execute("SELECT id, key_id, blob FROM filter_state"):
                stage, state = msgpack.unpackb(
                    self.sealer.open("filter_state", hid.hex(), kid, blob)
                )
                if _stage_id(self.identity_key, stage) != hid:
                    raise TamperedError(
                        "filter_state row does not belong to its stage", table="filter_state"
                    )
                out[stage] = state
            return out

        return await self._run(q)

    def _decode_batch(
        self, seq: int, kid: str, blob: bytes, n: int | None = None, span: tuple | None = None
    ) -> Batch:
        series, ts, value, flags = _unpack_batch(self.sealer.open("batches", seq, kid, blob), seq)
        batch = Batch(ts, value, series, flags)
        if (n is not None and n != len(batch)) or (
            span is not None and ts and span != (min(ts), max(ts))
        ):
            raise TamperedError(
                f"batches row {seq}: its clear columns (count, time range) do not match its "
                "sealed contents",
                table="batches",
                seq=seq,
            )
        return batch

    async def unsynced(self, after: int = 0, limit: int = 16) -> list[StoredBatch]:
        """The oldest batches not yet acknowledged by the cloud, decrypted."""

        def q(con: sqlite3.Connection) -> list[StoredBatch]:
            rows = con.execute(
                "SELECT seq, key_id, blob, n, t_min, t_max FROM batches WHERE synced=0 AND seq>? "
                "ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
            return [
                StoredBatch(s, self._decode_batch(s, k, b, n, (a, z))) for s, k, b, n, a, z in rows
            ]

        return await self._run(q)

    async def batches(
        self,
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> list[StoredBatch]:
        """Every batch overlapping [since, until), decrypted (small stores and tests; use
        :meth:`query` to stream)."""
        out = []
        async for chunk in self._batch_chunks(since_ms, until_ms):
            out.extend(chunk)
        return out

    async def _batch_chunks(
        self, since_ms: int | None, until_ms: int | None, chunk: int = 64
    ) -> AsyncIterator[list[StoredBatch]]:
        after = 0
        while True:

            def q(con: sqlite3.Connection, after: int = after) -> list[StoredBatch]:
                where, args = _time_range(since_ms, until_ms)
                rows = con.execute(
                    "SELECT seq, key_id, blob, n, t_min, t_max FROM batches WHERE seq > ?"
                    f"{where} ORDER BY seq LIMIT ?",
                    [after, *args, chunk],
                ).fetchall()
                return [
                    StoredBatch(s, self._decode_batch(s, k, b, n, (a, z)))
                    for s, k, b, n, a, z in rows
                ]

            got = await self._run(q)
            if not got:
                return
            top = max((max(sb.batch.series) for sb in got if len(sb.batch)), default=-1)
            if top >= len(self.registry):
                # series a running writer added since this store was opened: they were
                # committed with (or before) the batches that use them
                await self._run(self._load_series)
            yield got
            after = got[-1].seq

    async def count(self, since_ms: int | None = None, until_ms: int | None = None) -> int:
        """Readings in batches overlapping [since, until) (an upper bound for a query)."""

        def q(con: sqlite3.Connection) -> int:
            where, args = _time_range(since_ms, until_ms)
            sql = f"SELECT coalesce(sum(n), 0) FROM batches WHERE 1=1{where}"
            return con.execute(sql, args).fetchone()[0]

        return await self._run(q)

    async def query(
        self,
        *,
        device: str | None = None,
        metric: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> AsyncIterator[Reading]:
        """Readings by device, metric and time range [since, until), decrypted, in commit
        order.  ``progress(n)`` is called with the readings scanned so far."""
        scanned = 0
        wanted: set[int] | None = None
        known = len(self.registry)
        async for chunk in self._batch_chunks(since_ms, until_ms):
            if len(self.registry) != known:  # series added by a running writer
                known, wanted = len(self.registry), None
            for sb in chunk:
                b = sb.batch
                if wanted is None and (device is not None or metric is not None):
                    wanted = {
                        i
                        for i in range(len(self.registry))
                        if (device is None or self.registry.key(i).device == device)
                        and (metric is None or self.registry.key(i).metric == metric)
                    }
                for ts, value, sid, flags in b.rows():
                    if since_ms is not None and ts < since_ms:
                        continue
                    if until_ms is not None and ts >= until_ms:
                        continue
                    if wanted is not None and sid not in wanted:
                        continue
                    key = self.registry.key(sid)
                    yield Reading(key.device, key.metric, ts, value, key.tag_dict, flags)
                scanned += len(b)
            if progress is not None:
                progress(scanned)

    async def dead_letters(self) -> list[DeadLetter]:
        def q(con: sqlite3.Connection) -> list[DeadLetter]:
            out = []
            for seq, kid, blob in con.execute(
                "SELECT seq, key_id, blob FROM dead_letters ORDER BY seq"
            ):
                out.append(
                    DeadLetter(*msgpack.unpackb(self.sealer.open("dead_letters", seq, kid, blob)))
                )
            return out

        return await self._run(q)

    async def unsynced_dead_letters(self, limit: int = 200) -> list[tuple[int, DeadLetter]]:
        """The oldest dead letters not yet reported to the cloud, with their sequence."""

        def q(con: sqlite3.Connection) -> list[tuple[int, DeadLetter]]:
            rows = con.execute(
                "SELECT seq, key_id, blob FROM dead_letters WHERE synced=0 ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
            return [
                (seq, DeadLetter(*msgpack.unpackb(self.sealer.open("dead_letters", seq, kid, b))))
                for seq, kid, b in rows
            ]

        return await self._run(q)

    async def mark_dead_letters_synced(self, seqs: Iterable[int]) -> None:
        await self._mark_synced("dead_letters", seqs)

    async def verify(self) -> dict[str, Any]:
        """Check everything: SQLite's integrity check, every row decrypts in its place, and
        no batch is missing (batches + evicted == sequence numbers handed out).
        Raises StoreError / TamperedError; returns counts when all is well."""

        def q(con: sqlite3.Connection) -> dict[str, Any]:
            # one read transaction: a consistent snapshot while a running edgepipe writes
            con.execute("BEGIN")
            try:
                return check(con)
            finally:
                con.execute("COMMIT")

        def check(con: sqlite3.Connection) -> dict[str, Any]:
            res = [r[0] for r in con.execute("PRAGMA integrity_check")]
            if res != ["ok"]:
                raise StoreError(f"{self.path}: integrity check failed: {'; '.join(res[:5])}")
            counts: dict[str, int] = {}
            for table, pk in _SEALED:
                n = 0
                for rid, kid, blob in con.execute(f"SELECT {pk}, key_id, blob FROM {table}"):
                    self.sealer.open(table, _aad_row(rid), kid, blob)
                    n += 1
                counts[table] = n
            for seq, kid, blob, n, a, z in con.execute(
                "SELECT seq, key_id, blob, n, t_min, t_max FROM batches"
            ):
                self._decode_batch(seq, kid, blob, n, (a, z))
            last = self._meta(con, "last_seq", 0)
            evicted = self._meta(con, "evicted", 0)
            if counts["batches"] + evicted != last:
                raise TamperedError(
                    f"{self.path}: {last - evicted - counts['batches']} batch(es) missing "
                    f"(sequence numbers 1..{last}, {evicted} evicted, {counts['batches']} "
                    "present)",
                    table="batches",
                )
            return counts

        return await self._run(q)

    async def stats(self) -> dict[str, Any]:
        def q(con: sqlite3.Connection) -> dict[str, Any]:
            b, r, ub, ur, oldest, first_unsynced = con.execute(
                "SELECT count(*), coalesce(sum(n),0), coalesce(sum(synced=0),0), "
                "coalesce(sum(CASE WHEN synced=0 THEN n ELSE 0 END),0), "
                "min(CASE WHEN synced=0 THEN t_min END), "
                "min(CASE WHEN synced=0 THEN seq END) FROM batches"
            ).fetchone()
            dl = con.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            last = self._meta(con, "last_seq", 0)
            kid = self.sealer.keyring.active_id
            return {
                "batches": b,
                "readings": r,
                "unsynced_batches": ub,
                "unsynced_readings": ur,
                "oldest_unsynced_ms": oldest,
                "sync_cursor": (first_unsynced - 1) if first_unsynced else last,
                "dead_letters": dl,
                "db_bytes": con.execute("PRAGMA page_count").fetchone()[0]
                * con.execute("PRAGMA page_size").fetchone()[0],
                "used_bytes": self._used_bytes(con),
                "disk_bytes": self.disk_bytes(),
                "quota_bytes": self.max_bytes,
                "evicted_batches": self._meta(con, "evicted", 0),
                "key_id": kid,
                "key_seals": self._meta(con, f"uses:{kid}", 0),
                "last_seq": last,
                "schema_version": con.execute("PRAGMA user_version").fetchone()[0],
            }

        return await self._run(q)

    def disk_bytes(self) -> int:
        """Size on disk: the database, its WAL and its shared-memory index."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                pass
        return total

    # -- closing ----------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def fin(con: sqlite3.Connection) -> None:
            try:
                con.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            if self._io is not None:
                self._io.close()

        try:
            await self._db._execute(lambda: fin(self._db._conn))
        except Exception:
            pass
        await self._db.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _time_range(since_ms: int | None, until_ms: int | None) -> tuple[str, list[int]]:
    """SQL conditions (each starting with AND) for batches overlapping [since, until)."""
    where, args = "", []
    if since_ms is not None:
        where += " AND t_max >= ?"
        args.append(since_ms)
    if until_ms is not None:
        where += " AND t_min < ?"
        args.append(until_ms)
    return where, args


async def open_store(cfg: Any, *, create: bool = True) -> Store:
    """The store of a loaded ``pipeline.yaml`` (:class:`~config._models.PipelineConfig`)."""
    from core._errors import ConfigError

    sc = cfg.store
    if sc.key is None:
        raise ConfigError("store.key is required (a keyring file, env var or secret)")
    return await Store.open(
        cfg.resolve(sc.path),
        Keyring.from_secret(sc.key),
        device_id=cfg.device.id,
        quota_bytes=int(sc.quota_mb * 1024 * 1024),
        on_full=sc.on_full,
        synchronous=sc.synchronous,
        create=create,
    )
