"""Reads of the store, each a function of the raw connection run on the store's worker
thread: batches (by sync state or time range), counts, message identities, filter state,
dead letters, the verification of every row, and the numbers of ``edgepipe status``."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from core._errors import StoreError, TamperedError
from core._model import Batch, DeadLetter, SeriesKey, SeriesRegistry
from protocol._keys import Sealer

from ._codec import SEALED, aad_row, open_batch, stage_id
from ._quota import disk_bytes, used_bytes
from ._schema import meta

__all__ = [
    "StoredBatch",
    "batch_chunk",
    "count",
    "dead_letters",
    "load_series",
    "load_states",
    "rows_by_key",
    "seen",
    "stats",
    "unsynced",
    "unsynced_dead_letters",
    "verify",
]


class StoredBatch(NamedTuple):
    seq: int
    batch: Batch


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


def load_series(
    con: sqlite3.Connection, sealer: Sealer, registry: SeriesRegistry | None, path: Path
) -> SeriesRegistry:
    """``registry`` extended with the series committed since it was loaded."""
    keys = list(registry._keys) if registry is not None else []
    for sid, kid, blob in con.execute(
        "SELECT id, key_id, blob FROM series WHERE id >= ? ORDER BY id", (len(keys),)
    ):
        if sid != len(keys):
            raise TamperedError(f"{path}: series table has a gap at id {len(keys)}", table="series")
        d, m, t = msgpack.unpackb(sealer.open("series", sid, kid, blob))
        keys.append(SeriesKey(d, m, tuple(tuple(x) for x in t)))
    return SeriesRegistry(keys)


def seen(con: sqlite3.Connection, want: set[bytes]) -> set[bytes]:
    """Which of the message identities ``want`` are in the log, newest commits first."""
    out: set[bytes] = set()
    for (ids,) in con.execute("SELECT ids FROM seen ORDER BY n DESC"):
        out.update(want.intersection(msgpack.unpackb(ids)))
        if len(out) == len(want):
            break
    return out


def unsynced(con: sqlite3.Connection, sealer: Sealer, after: int, limit: int) -> list[StoredBatch]:
    rows = con.execute(
        "SELECT seq, key_id, blob, n, t_min, t_max FROM batches WHERE synced=0 AND seq>? "
        "ORDER BY seq LIMIT ?",
        (after, limit),
    ).fetchall()
    return [StoredBatch(s, open_batch(sealer, s, k, b, n, (a, z))) for s, k, b, n, a, z in rows]


def batch_chunk(
    con: sqlite3.Connection,
    sealer: Sealer,
    after: int,
    since_ms: int | None,
    until_ms: int | None,
    chunk: int,
) -> list[StoredBatch]:
    """Up to ``chunk`` batches after seq ``after`` overlapping [since, until)."""
    where, args = _time_range(since_ms, until_ms)
    rows = con.execute(
        f"SELECT seq, key_id, blob, n, t_min, t_max FROM batches WHERE seq > ?{where} "
        "ORDER BY seq LIMIT ?",
        [after, *args, chunk],
    ).fetchall()
    return [StoredBatch(s, open_batch(sealer, s, k, b, n, (a, z))) for s, k, b, n, a, z in rows]


def count(con: sqlite3.Connection, since_ms: int | None, until_ms: int | None) -> int:
    where, args = _time_range(since_ms, until_ms)
    sql = f"SELECT coalesce(sum(n), 0) FROM batches WHERE 1=1{where}"
    return con.execute(sql, args).fetchone()[0]


def load_states(con: sqlite3.Connection, sealer: Sealer, identity_key: bytes) -> dict[str, bytes]:
    out = {}
    for hid, kid, blob in con.execute("SELECT id, key_id, blob FROM filter_state"):
        stage, state = msgpack.unpackb(sealer.open("filter_state", hid.hex(), kid, blob))
        if stage_id(identity_key, stage) != hid:
            raise TamperedError(
                "filter_state row does not belong to its stage", table="filter_state"
            )
        out[stage] = state
    return out


def dead_letters(con: sqlite3.Connection, sealer: Sealer) -> list[DeadLetter]:
    out = []
    for seq, kid, blob in con.execute("SELECT seq, key_id, blob FROM dead_letters ORDER BY seq"):
        out.append(DeadLetter(*msgpack.unpackb(sealer.open("dead_letters", seq, kid, blob))))
    return out


def unsynced_dead_letters(
    con: sqlite3.Connection, sealer: Sealer, limit: int
) -> list[tuple[int, DeadLetter]]:
    rows = con.execute(
        "SELECT seq, key_id, blob FROM dead_letters WHERE synced=0 ORDER BY seq LIMIT ?",
        (limit,),
    ).fetchall()
    return [
        (seq, DeadLetter(*msgpack.unpackb(sealer.open("dead_letters", seq, kid, b))))
        for seq, kid, b in rows
    ]


def rows_by_key(con: sqlite3.Connection) -> dict[str, int]:
    """How many sealed rows each key id holds."""
    out: dict[str, int] = {}
    for table, _pk in SEALED:
        for kid, n in con.execute(f"SELECT key_id, count(*) FROM {table} GROUP BY key_id"):
            out[kid] = out.get(kid, 0) + n
    return out


def verify(con: sqlite3.Connection, sealer: Sealer, path: Path) -> dict[str, int]:
    """SQLite's integrity check, every row decrypts in its place, and no batch is missing
    (batches + evicted == sequence numbers handed out), in one read transaction: a
    consistent snapshot while a running edgepipe writes."""
    con.execute("BEGIN")
    try:
        return _check(con, sealer, path)
    finally:
        con.execute("COMMIT")


def _check(con: sqlite3.Connection, sealer: Sealer, path: Path) -> dict[str, int]:
    res = [r[0] for r in con.execute("PRAGMA integrity_check")]
    if res != ["ok"]:
        raise StoreError(f"{path}: integrity check failed: {'; '.join(res[:5])}")
    counts: dict[str, int] = {}
    for table, pk in SEALED:
        n = 0
        for rid, kid, blob in con.execute(f"SELECT {pk}, key_id, blob FROM {table}"):
            sealer.open(table, aad_row(rid), kid, blob)
            n += 1
        counts[table] = n
    for seq, kid, blob, n, a, z in con.execute(
        "SELECT seq, key_id, blob, n, t_min, t_max FROM batches"
    ):
        open_batch(sealer, seq, kid, blob, n, (a, z))
    last = meta(con, "last_seq", 0)
    evicted = meta(con, "evicted", 0)
    if counts["batches"] + evicted != last:
        raise TamperedError(
            f"{path}: {last - evicted - counts['batches']} batch(es) missing "
            f"(sequence numbers 1..{last}, {evicted} evicted, {counts['batches']} "
            "present)",
            table="batches",
        )
    return counts


def stats(con: sqlite3.Connection, sealer: Sealer, path: Path, quota_bytes: int) -> dict[str, Any]:
    b, r, ub, ur, oldest, first_unsynced = con.execute(
        "SELECT count(*), coalesce(sum(n),0), coalesce(sum(synced=0),0), "
        "coalesce(sum(CASE WHEN synced=0 THEN n ELSE 0 END),0), "
        "min(CASE WHEN synced=0 THEN t_min END), "
        "min(CASE WHEN synced=0 THEN seq END) FROM batches"
    ).fetchone()
    dl = con.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    last = meta(con, "last_seq", 0)
    kid = sealer.keyring.active_id
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
        "used_bytes": used_bytes(con),
        "disk_bytes": disk_bytes(path),
        "quota_bytes": quota_bytes,
        "evicted_batches": meta(con, "evicted", 0),
        "key_id": kid,
        "key_seals": meta(con, f"uses:{kid}", 0),
        "last_seq": last,
        "schema_version": con.execute("PRAGMA user_version").fetchone()[0],
    }
