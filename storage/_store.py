"""The encrypted local store: SQLite (WAL) through aiosqlite, one transaction per batch.

Durability: the MQTT acknowledgement follows the commit, so a commit must survive power
loss.  In WAL mode ``synchronous=NORMAL`` may lose the last transactions on power loss
(the database stays consistent, but acked readings would be gone), so edgepipe runs
``synchronous=FULL``: one fsync of the WAL per commit, i.e. per batch, not per reading.

Each commit runs as one function on aiosqlite's worker thread (sealing included), so the
event loop keeps reading MQTT while SQLite writes and fsyncs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import aiosqlite
import msgpack

from pipeline._errors import StoreError, StoreFullError
from pipeline._metrics import METRICS
from pipeline._model import Batch, DeadLetter, SeriesKey, SeriesRegistry

from ._crypto import KEY_REFUSE_AT, KEY_WARN_AT, Keyring, Sealer

__all__ = ["Store", "StoredBatch"]

log = logging.getLogger("edgepipe.store")
T = TypeVar("T")

_committed = METRICS.counter("edgepipe_store_batches_total", "batches committed to the store")
_stored = METRICS.counter("edgepipe_readings_stored_total", "readings durably stored")

_SCHEMA = [
    # version 1
    """
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
    """,
]


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
    ) -> None:
        self._db = db
        self.path = path
        self.sealer = sealer
        self.registry = registry
        self.max_bytes = max_bytes
        self._closed = False
        self.last_seq = 0
        self._key_uses: dict[str, int] = {}

    # -- opening ----------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        path: str | Path,
        keyring: Keyring,
        *,
        device_id: str,
        quota_bytes: int = 1 << 30,
        synchronous: str = "FULL",
    ) -> Store:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            store = cls(db, path, Sealer(keyring, device_id), SeriesRegistry(), quota_bytes)
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
        return await db._execute(lambda: fn(db._conn, *args))

    def _init_sync(self, con: Any, synchronous: str) -> None:
        import sqlite3

        try:
            con.execute("PRAGMA busy_timeout=10000")
            con.execute("PRAGMA auto_vacuum=INCREMENTAL")  # effective on a new file only
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not an edgepipe store or damaged: {e}") from None
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: cannot enable WAL mode (got {mode})")
        con.execute(f"PRAGMA synchronous={synchronous}")
        con.execute("PRAGMA secure_delete=ON")  # deleted rows are zeroed, not left behind
        con.execute("PRAGMA foreign_keys=ON")
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_SCHEMA):
            raise StoreError(
                f"{self.path}: written by a newer edgepipe (schema {version}); refusing to open"
            )
        for v in range(version, len(_SCHEMA)):
            con.executescript("BEGIN;" + _SCHEMA[v] + f"PRAGMA user_version={v + 1}; COMMIT;")
        # the device this store belongs to and a check value per key
        row = con.execute("SELECT v FROM meta WHERE k='device'").fetchone()
        device = self.sealer.device.decode()
        if row is None:
            con.execute("INSERT INTO meta VALUES ('device', ?)", (device,))
        elif row[0] != device:
            raise StoreError(
                f"{self.path} belongs to device {row[0]!r}, not {device!r}; refusing to mix"
            )
        self._check_keys(con)
        # series names
        keys = []
        for sid, kid, blob in con.execute("SELECT id, key_id, blob FROM series ORDER BY id"):
            if sid != len(keys):
                raise StoreError(f"{self.path}: series table has a gap at id {len(keys)}")
            d, m, t = msgpack.unpackb(self.sealer.open("series", sid, kid, blob))
            keys.append(SeriesKey(d, m, tuple(tuple(x) for x in t)))
        self.registry = SeriesRegistry(keys)
        self.last_seq = con.execute("SELECT coalesce(max(seq), 0) FROM batches").fetchone()[0]
        for k, v in con.execute("SELECT k, v FROM meta WHERE k LIKE 'uses:%'"):
            self._key_uses[k[5:]] = v

    def _check_keys(self, con: Any) -> None:
        """A check value per key id: a wrong key is a clear error, not 'tampered data'."""
        s = self.sealer
        for kid in s.keyring.ids:
            row = con.execute("SELECT v FROM meta WHERE k=?", (f"kcv:{kid}",)).fetchone()
            if row is None:
                blob = s._aead[kid].encrypt(
                    b"\0" * 12, b"edgepipe key check", s._aad("meta", "kcv", kid)
                )
                con.execute("INSERT INTO meta VALUES (?, ?)", (f"kcv:{kid}", blob))
            else:
                try:
                    s._aead[kid].decrypt(b"\0" * 12, row[0], s._aad("meta", "kcv", kid))
                except Exception:
                    from pipeline._errors import KeyError_

                    raise KeyError_(
                        f"the key with id {kid!r} from {s.keyring.source} is not the key this "
                        f"store was written with; nothing was changed"
                    ) from None
        used = {r[0] for r in con.execute("SELECT DISTINCT key_id FROM batches")}
        missing = used - set(s.keyring.ids)
        if missing:
            from pipeline._errors import KeyError_

            raise KeyError_(
                f"the store has rows written with key id(s) {sorted(missing)} that are not in "
                f"the keyring from {s.keyring.source}; nothing was changed"
            )

    # -- writing ----------------------------------------------------------------------
    async def seen(self, keys: list[bytes]) -> set[bytes]:
        """Which of these message identities are already committed."""
        if not keys:
            return set()

        def q(con: Any) -> set[bytes]:
            out: set[bytes] = set()
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                out.update(
                    r[0] for r in con.execute(f"SELECT id FROM seen WHERE id IN ({marks})", chunk)
                )
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

    def _commit_sync(
        self,
        con: Any,
        batch: Batch,
        dead: list[DeadLetter],
        keys: list[bytes],
        states: dict[str, bytes],
        new_series: list[tuple[int, SeriesKey]],
    ) -> int | None:
        import sqlite3

        seal = self.sealer.seal
        kid_active = self.sealer.keyring.active_id
        uses = self._key_uses.get(kid_active, 0)
        if uses >= KEY_REFUSE_AT:
            raise StoreError(
                f"key {kid_active!r} has sealed {uses} rows; rotate it (edgepipe keys rotate)"
            )
        n_seal = 0
        try:
            con.execute("BEGIN IMMEDIATE")
            for sid, key in new_series:
                kid, blob = seal("series", sid, msgpack.packb([key.device, key.metric, key.tags]))
                con.execute("INSERT INTO series VALUES (?, ?, ?)", (sid, kid, blob))
                n_seal += 1
            seq = None
            if len(batch):
                seq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM batches").fetchone()[0]
                plain = msgpack.packb([batch.series, batch.ts, batch.value, batch.flags])
                kid, blob = seal("batches", seq, plain)
                con.execute(
                    "INSERT INTO batches (seq, key_id, blob, n, t_min, t_max) VALUES (?,?,?,?,?,?)",
                    (seq, kid, blob, len(batch), min(batch.ts), max(batch.ts)),
                )
                n_seal += 1
            for d in dead:
                dseq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM dead_letters").fetchone()[
                    0
                ]
                kid, blob = seal("dead_letters", dseq, msgpack.packb(list(d)))
                con.execute(
                    "INSERT INTO dead_letters (seq, key_id, blob) VALUES (?,?,?)", (dseq, kid, blob)
                )
                n_seal += 1
            if keys:
                ref = seq or 0
                con.executemany(
                    "INSERT OR IGNORE INTO seen VALUES (?, ?)", [(k, ref) for k in keys]
                )
            for stage, blob_plain in states.items():
                kid, blob = seal("filter_state", stage, blob_plain)
                con.execute(
                    "INSERT OR REPLACE INTO filter_state VALUES (?, ?, ?)", (stage, kid, blob)
                )
                n_seal += 1
            if n_seal:
                uses += n_seal
                con.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"uses:{kid_active}", uses)
                )
            con.execute("COMMIT")
        except sqlite3.OperationalError as e:
            con.rollback() if con.in_transaction else None
            if "full" in str(e).lower() or "disk" in str(e).lower():
                raise StoreFullError(f"store is full: {e}") from None
            raise StoreError(f"commit failed: {e}") from None
        except BaseException:
            if con.in_transaction:
                con.rollback()
            raise
        self._key_uses[kid_active] = uses
        if uses >= KEY_WARN_AT and (uses - n_seal) < KEY_WARN_AT:
            log.warning(
                "key %r has sealed %d rows: rotate it soon (edgepipe keys rotate)", kid_active, uses
            )
        return seq

    # -- reading ----------------------------------------------------------------------
    async def load_states(self) -> dict[str, bytes]:
        def q(con: Any) -> dict[str, bytes]:
            return {
                stage: self.sealer.open("filter_state", stage, kid, blob)
                for stage, kid, blob in con.execute("SELECT stage, key_id, blob FROM filter_state")
            }

        return await self._run(q)

    def _decode_batch(self, seq: int, kid: str, blob: bytes) -> Batch:
        series, ts, value, flags = msgpack.unpackb(self.sealer.open("batches", seq, kid, blob))
        return Batch(ts, value, series, flags)

    async def unsynced(self, after: int = 0, limit: int = 16) -> list[StoredBatch]:
        """The oldest batches not yet acknowledged by the cloud, decrypted."""

        def q(con: Any) -> list[StoredBatch]:
            rows = con.execute(
                "SELECT seq, key_id, blob FROM batches WHERE synced=0 AND seq>? "
                "ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
            return [StoredBatch(s, self._decode_batch(s, k, b)) for s, k, b in rows]

        return await self._run(q)

    async def mark_synced(self, seqs: Iterable[int]) -> None:
        seqs = list(seqs)
        if not seqs:
            return

        def q(con: Any) -> None:
            con.execute("BEGIN")
            con.executemany("UPDATE batches SET synced=1 WHERE seq=?", [(s,) for s in seqs])
            con.execute("COMMIT")

        await self._run(q)

    async def batches(
        self,
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> list[StoredBatch]:
        def q(con: Any) -> list[StoredBatch]:
            sql = "SELECT seq, key_id, blob FROM batches WHERE 1=1"
            args: list[int] = []
            if since_ms is not None:
                sql += " AND t_max >= ?"
                args.append(since_ms)
            if until_ms is not None:
                sql += " AND t_min < ?"
                args.append(until_ms)
            rows = con.execute(sql + " ORDER BY seq", args).fetchall()
            return [StoredBatch(s, self._decode_batch(s, k, b)) for s, k, b in rows]

        return await self._run(q)

    async def dead_letters(self) -> list[DeadLetter]:
        def q(con: Any) -> list[DeadLetter]:
            out = []
            for seq, kid, blob in con.execute(
                "SELECT seq, key_id, blob FROM dead_letters ORDER BY seq"
            ):
                out.append(
                    DeadLetter(*msgpack.unpackb(self.sealer.open("dead_letters", seq, kid, blob)))
                )
            return out

        return await self._run(q)

    async def stats(self) -> dict[str, Any]:
        def q(con: Any) -> dict[str, Any]:
            b, r, ub, ur, oldest = con.execute(
                "SELECT count(*), coalesce(sum(n),0), coalesce(sum(synced=0),0), "
                "coalesce(sum(CASE WHEN synced=0 THEN n ELSE 0 END),0), "
                "min(CASE WHEN synced=0 THEN t_min END) FROM batches"
            ).fetchone()
            dl = con.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            page = con.execute("PRAGMA page_size").fetchone()[0]
            pages = con.execute("PRAGMA page_count").fetchone()[0]
            return {
                "batches": b,
                "readings": r,
                "unsynced_batches": ub,
                "unsynced_readings": ur,
                "oldest_unsynced_ms": oldest,
                "dead_letters": dl,
                "db_bytes": page * pages,
                "key_id": self.sealer.keyring.active_id,
                "last_seq": self.last_seq,
            }

        return await self._run(q)

    # -- closing ----------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._db.execute("PRAGMA optimize")
        except Exception:
            pass
        await self._db.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def now_ms() -> int:
    return int(time.time() * 1000)
