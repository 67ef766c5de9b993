"""Bounded, sealed rings of device records: health snapshots (``health``) and warning log
records (``logs``).

Each row is one msgpack record sealed with the store's :class:`~protocol._keys.Sealer`
like every other row (table and sequence in the associated data), kept until the receiver
acknowledged it and at most :data:`RING_ROWS` per table: appending beyond drops the oldest
(synced first), so a device offline for weeks keeps its newest history and a bounded file.
The sync worker reads the unsynced rows in sequence order, so a gap while offline fills in
once the link is back, like readings do.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

import msgpack

from ._keyuse import KeyUses

__all__ = ["RING_ROWS", "RING_TABLES", "RingRecord", "append", "mark_synced", "unsynced"]

#: Rows kept per ring: ~4 days of one snapshot a minute, or 5,000 distinct warnings.
RING_ROWS = {"health": 6_000, "logs": 5_000}
RING_TABLES = tuple(RING_ROWS)

RingRecord = tuple[int, dict[str, Any]]


def append(
    con: sqlite3.Connection, uses: KeyUses, table: str, records: Iterable[dict[str, Any]]
) -> int:
    """Seal and append ``records`` (each with an integer ``ts``) in one transaction, then
    trim the ring to its bound.  Returns the number of rows the trim removed."""
    if table not in RING_ROWS:
        raise ValueError(f"not a ring: {table!r}")
    rows = list(records)
    if not rows:
        return 0
    uses.refuse_worn()
    try:
        con.execute("BEGIN IMMEDIATE")
        (seq,) = con.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()
        last = con.execute("SELECT v FROM meta WHERE k=?", (f"last_{table}_seq",)).fetchone()
        seq = max(seq, last[0] if last else 0)
        for rec in rows:
            seq += 1
            kid, blob = uses.seal(table, seq, msgpack.packb(rec, use_bin_type=True))
            con.execute(
                f"INSERT INTO {table} (seq, ts, key_id, blob) VALUES (?, ?, ?, ?)",
                (seq, int(rec["ts"]), kid, blob),
            )
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"last_{table}_seq", seq))
        trimmed = _trim(con, table, RING_ROWS[table])
        uses.flush(con)
        con.execute("COMMIT")
    except BaseException:
        uses.abort(con)
        raise
    return trimmed


def _trim(con: sqlite3.Connection, table: str, keep: int) -> int:
    (n,) = con.execute(f"SELECT count(*) FROM {table}").fetchone()
    over = n - keep
    if over <= 0:
        return 0
    for synced in (1, 0):  # what the receiver has already goes first
        if over <= 0:
            break
        cur = con.execute(
            f"DELETE FROM {table} WHERE seq IN "
            f"(SELECT seq FROM {table} WHERE synced=? ORDER BY seq LIMIT ?)",
            (synced, over),
        )
        over -= cur.rowcount
    return n - keep - max(over, 0)


def unsynced(con: sqlite3.Connection, sealer: Any, table: str, limit: int) -> list[RingRecord]:
    """The oldest ``limit`` records the receiver has not acknowledged, decrypted."""
    rows = con.execute(
        f"SELECT seq, key_id, blob FROM {table} WHERE synced=0 ORDER BY seq LIMIT ?", (limit,)
    ).fetchall()
    return [(seq, msgpack.unpackb(sealer.open(table, seq, kid, b))) for seq, kid, b in rows]


def mark_synced(con: sqlite3.Connection, table: str, seqs: list[int]) -> None:
    if not seqs:
        return
    con.execute("BEGIN")
    con.executemany(f"UPDATE {table} SET synced=1 WHERE seq=?", [(s,) for s in seqs])
    con.execute("COMMIT")
