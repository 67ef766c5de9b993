"""The encrypted local store: SQLite (WAL) through aiosqlite, one transaction per batch.

Durability: the MQTT acknowledgement follows the commit, so a commit must survive power
loss.  In WAL mode ``synchronous=NORMAL`` may lose the last transactions on power loss
(the database stays consistent, but acked readings would be gone), so edgepipe runs
``synchronous=FULL``: one fsync of the WAL per commit, i.e. per batch, not per reading.
``bench/store.py`` measures what that costs against NORMAL.

Each commit runs as one function on aiosqlite's worker thread (sealing included, see
``_writer``), so the event loop keeps reading MQTT while SQLite writes and fsyncs.  Before
it writes, a commit makes room within the quota (``_quota``).  The schema and its
migrations are in ``_schema``, the row formats in ``_codec``, the key and device checks in
``_keycheck``, key wear in ``_keyuse`` and the reads in ``_queries``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack

from core._errors import StoreError
from core._model import Batch, DeadLetter, Reading, SeriesKey, SeriesRegistry
from protocol._keys import Keyring, Sealer

from . import _logring as ring
from . import _queries as q
from ._codec import SEALED, batch_span, pack_batch, stage_id
from ._keycheck import check_device, check_keys, has_new_keys
from ._keyuse import KeyUses
from ._metrics import committed, key_seals, per_reading, stored, written
from ._queries import StoredBatch
from ._quota import ON_FULL, disk_bytes, make_room, reclaim
from ._schema import SCHEMA_VERSION, meta, migrate, stored_version
from ._seenfilter import Bits, SeenFilter
from ._writer import Writer, configure

__all__ = ["SCHEMA_VERSION", "Store", "StoredBatch"]

log = logging.getLogger("edgepipe.store")


class Store:
    """The local store.  ``async with await Store.open(...) as store: ...``."""

    #: message identities are kept for at least this many commits and this many seconds.
    #: An edgepipe crash only leaves the batch in hand unacknowledged, but a broker that
    #: crashes restores its last autosave and resends what was acknowledged since then:
    #: the window must cover the broker's ``autosave_interval`` (docs/broker.md).
    SEEN_KEEP = 256
    SEEN_WINDOW_S = 120.0
    #: ... and at least this many when the quota is reached
    SEEN_MIN_KEEP = 16

    def __init__(
        self,
        writer: Writer,
        sealer: Sealer,
        registry: SeriesRegistry,
        max_bytes: int,
        on_full: str = "backpressure",
    ) -> None:
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be 'backpressure' or 'drop_oldest', not {on_full!r}")
        self._writer = writer
        #: ``fn(con, *args)`` on the store's worker thread (see :meth:`Writer.run`)
        self._run = writer.run
        self._io = writer.io
        self.path = writer.path
        self.sealer = sealer
        self.registry = registry
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.last_seq = 0
        self.schema_version = 0
        self.identity_key = b""
        self._uses = KeyUses(sealer)
        self.bytes_written = 0
        self._readings = 0
        # (seen row, monotonic time) of the identities this process committed
        self._seen_rows: collections.deque[tuple[int, float]] = collections.deque()
        self._opened_at = time.monotonic()
        self._first_seen_row: int | None = None
        self._seen_filter = SeenFilter()

    def use_seen_bits(self, bits: Callable[[int], Bits]) -> None:
        """Keep the redelivery filter's bits in what ``bits(log2)`` makes (the edge passes the
        ingest kernel's; the default is a ``bytearray`` and a Python loop per identity)."""
        self._seen_filter.drop()
        self._seen_filter = SeenFilter(bits)

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
        writer = await Writer.connect(path)
        try:
            store = cls(writer, Sealer(keyring, device_id), SeriesRegistry(), quota_bytes, on_full)
            await store._run(store._init_sync, synchronous)
        except BaseException:
            await writer.close(optimize=False)
            raise
        return store

    def _init_sync(self, con: sqlite3.Connection, synchronous: str) -> None:
        configure(con, self.path, synchronous)
        version = stored_version(con, self.path)
        if version > 0:  # an existing store: check the keys and device before any change
            check_keys(con, self.sealer, version)
            check_device(con, self.sealer, self.path)
        migrate(con, version, self._uses, self.path)
        self.schema_version = SCHEMA_VERSION
        if has_new_keys(con, self.sealer):  # a new store, or keys added to the keyring
            con.execute("BEGIN IMMEDIATE")
            check_keys(con, self.sealer, SCHEMA_VERSION)
            con.execute("COMMIT")
        if 0 < version < SCHEMA_VERSION:
            reclaim(con)  # old-format pages zeroed and out of the WAL
        (row,) = con.execute("SELECT key_id, blob FROM secrets WHERE name='identity'")
        self.identity_key = self.sealer.open("secrets", "identity", row[0], row[1])
        self._load_series(con)
        self.last_seq = meta(con, "last_seq", 0)
        self._uses.load(con)

    def _load_series(self, con: sqlite3.Connection) -> None:
        self.registry = q.load_series(con, self.sealer, self.registry, self.path)

    # -- writing ----------------------------------------------------------------------
    async def seen(self, keys: list[bytes]) -> set[bytes]:
        """Which of these message identities are already committed (those of the last
        :attr:`SEEN_KEEP` commits and :attr:`SEEN_WINDOW_S` seconds are kept).  Only
        messages that may be redeliveries are looked up, and a Bloom filter of the stored
        identities (``_seenfilter``) rules out almost every one that is not stored, so the
        table is read only for the few it cannot rule out."""
        if not keys:
            return set()
        return await self._run(self._seen_sync, set(keys))

    def seen_in_memory(self, keys: list[bytes]) -> set[bytes] | None:
        """The identities of ``keys`` the Bloom filter cannot rule out, answered on the
        caller's thread without waiting for the worker thread (a commit may be running
        there): a superset of those committed before that commit.  None while there is no
        filter (:meth:`seen` builds it).  Only the candidates need :meth:`seen`."""
        return self._seen_filter.probe(set(keys))

    def _seen_sync(self, con: sqlite3.Connection, want: set[bytes]) -> set[bytes]:
        # the filter rules out almost every identity that is not stored (_seenfilter)
        maybe = self._seen_filter.candidates(con, want)
        return q.seen(con, maybe) if maybe else set()

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
            committed.inc()
            stored.inc(len(batch))
        return seq

    def _commit_sync(
        self,
        con: sqlite3.Connection,
        batch: Batch,
        dead: list[DeadLetter],
        keys: list[bytes],
        states: dict[str, bytes],
        new_series: list[tuple[int, SeriesKey]],
    ) -> int | None:
        io = self._io.wchar()
        uses = self._uses
        uses.refuse_worn()
        evicted = False
        try:
            con.execute("BEGIN IMMEDIATE")
            seq = None
            plain = b""
            if len(batch):
                plain = pack_batch(batch)
            need = len(plain) + 64 * len(keys) + sum(len(d.payload) + 200 for d in dead) + 512
            evicted = make_room(con, need, self.max_bytes, self.on_full, self.SEEN_MIN_KEEP)
            seal = uses.seal
            for sid, key in new_series:
                kid, blob = seal("series", sid, msgpack.packb([key.device, key.metric, key.tags]))
                con.execute("INSERT INTO series VALUES (?, ?, ?)", (sid, kid, blob))
            last_seq = meta(con, "last_seq", 0)
            if len(batch):
                seq = last_seq = last_seq + 1
                kid, blob = seal("batches", seq, plain)
                con.execute(
                    "INSERT INTO batches (seq, key_id, blob, n, t_min, t_max) VALUES (?,?,?,?,?,?)",
                    (seq, kid, blob, len(batch), *batch_span(batch)),
                )
                con.execute("UPDATE meta SET v=? WHERE k='last_seq'", (seq,))
            if dead:
                dseq = meta(con, "last_dl_seq", 0)
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
                hid = stage_id(self.identity_key, stage)
                kid, blob = seal("filter_state", hid.hex(), msgpack.packb([stage, blob_plain]))
                con.execute(
                    "INSERT OR REPLACE INTO filter_state VALUES (?, ?, ?)", (hid, kid, blob)
                )
            n_uses = uses.flush(con)
            con.execute("COMMIT")
        except BaseException:
            uses.abort(con)
            raise
        if keys:
            self._seen_filter.committed(keys)
        if evicted:
            reclaim(con)
        key_seals.set(n_uses)
        wrote = self._io.wchar() - io
        self.bytes_written += wrote
        written.inc(wrote)
        self._readings += len(batch)
        if self._readings:
            per_reading.set(self.bytes_written / self._readings)
        return seq

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

    async def checkpoint(self) -> tuple[int, int, int]:
        """A truncating WAL checkpoint: (busy, WAL frames, frames checkpointed)."""
        return await self._run(
            lambda con: tuple(con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
        )

    async def mark_synced(self, seqs: Iterable[int]) -> None:
        await self._mark_synced("batches", seqs)

    async def mark_dead_letters_synced(self, seqs: Iterable[int]) -> None:
        await self._mark_synced("dead_letters", seqs)

    async def _mark_synced(self, table: str, seqs: Iterable[int]) -> None:
        rows = [(s,) for s in seqs]
        if not rows:
            return

        def mark(con: sqlite3.Connection) -> None:
            con.execute("BEGIN")
            con.executemany(f"UPDATE {table} SET synced=1 WHERE seq=?", rows)
            con.execute("COMMIT")

        await self._run(mark)

    # -- the device's own records: health snapshots and warning logs (``_logring``) --------
    async def append_records(self, table: str, records: list[dict[str, Any]]) -> int:
        """Seal and append records to the ``health`` or ``logs`` ring (bounded: the oldest
        give way); returns how many old rows the bound removed."""
        return await self._run(ring.append, self._uses, table, records)

    async def unsynced_records(self, table: str, limit: int = 200) -> list[ring.RingRecord]:
        """The oldest records of a ring not yet acknowledged by the receiver, decrypted."""
        return await self._run(ring.unsynced, self.sealer, table, limit)

    async def mark_records_synced(self, table: str, seqs: Iterable[int]) -> None:
        await self._run(ring.mark_synced, table, list(seqs))

    # -- key rotation ------------------------------------------------------------------
    async def rows_by_key(self) -> dict[str, int]:
        """How many sealed rows each key id holds (re-encryption progress)."""
        return await self._run(q.rows_by_key)

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
        for table, pk in SEALED:
            while True:
                n = await self._run(self._uses.reseal, table, pk, chunk)
                if not n:
                    break
                done += n
                if progress is not None:
                    progress(done, total)
                if pause:
                    await asyncio.sleep(pause)
        if done:
            await self._run(reclaim)
            log.info("re-encrypted %d row(s) under key %r", done, active)
        return done

    # -- reading ----------------------------------------------------------------------
    async def load_states(self) -> dict[str, bytes]:
        return await self._run(q.load_states, self.sealer, self.identity_key)

    async def unsynced(self, after: int = 0, limit: int = 16) -> list[StoredBatch]:
        """The oldest batches not yet acknowledged by the cloud, decrypted."""
        return await self._run(q.unsynced, self.sealer, after, limit)

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
            got = await self._run(q.batch_chunk, self.sealer, after, since_ms, until_ms, chunk)
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
        return await self._run(q.count, since_ms, until_ms)

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
        return await self._run(q.dead_letters, self.sealer)

    async def unsynced_dead_letters(self, limit: int = 200) -> list[tuple[int, DeadLetter]]:
        """The oldest dead letters not yet reported to the cloud, with their sequence."""
        return await self._run(q.unsynced_dead_letters, self.sealer, limit)

    async def verify(self) -> dict[str, Any]:
        """Check everything: SQLite's integrity check, every row decrypts in its place, and
        no batch is missing (batches + evicted == sequence numbers handed out).
        Raises StoreError / TamperedError; returns counts when all is well."""
        return await self._run(q.verify, self.sealer, self.path)

    async def stats(self) -> dict[str, Any]:
        return await self._run(q.stats, self.sealer, self.path, self.max_bytes)

    def disk_bytes(self) -> int:
        """Size on disk: the database, its WAL and its shared-memory index."""
        return disk_bytes(self.path)

    # -- closing ----------------------------------------------------------------------
    async def close(self) -> None:
        await self._writer.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
