"""Capacity: the store's quota of live pages, eviction to stay within it, and returning
freed space to the filesystem.

Before each commit the store checks its quota (bytes of live pages).  Over it, it first
evicts the oldest *synced* batches, then applies ``on_full`` to unsynced data:
``drop_oldest`` drops the oldest unsynced batches (counted and logged), ``backpressure``
raises :class:`~core._errors.StoreFullError` and nothing is written.  Eviction goes down to
a low-water mark (90 % of the quota) so it runs in rounds, not on every commit; each round
ends with :func:`reclaim` (an incremental vacuum and a truncating WAL checkpoint), so freed
space returns to the filesystem and no old WAL frame of a deleted row lingers."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from core._errors import StoreFullError

from ._metrics import dl_dropped, dropped, evicted

__all__ = ["ON_FULL", "disk_bytes", "make_room", "reclaim", "used_bytes"]

log = logging.getLogger("edgepipe.store")

#: what a full store does with unsynced data
ON_FULL = ("backpressure", "drop_oldest")


def used_bytes(con: sqlite3.Connection) -> int:
    """Bytes of live pages (the quota's measure)."""
    page = con.execute("PRAGMA page_size").fetchone()[0]
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    free = con.execute("PRAGMA freelist_count").fetchone()[0]
    return (pages - free) * page


def disk_bytes(path: Path) -> int:
    """Size on disk: the database, its WAL and its shared-memory index."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except OSError:
            pass
    return total


def make_room(
    con: sqlite3.Connection, need: int, max_bytes: int, on_full: str, seen_min_keep: int
) -> bool:
    """Inside the commit's transaction: keep live pages + ``need`` within ``max_bytes``,
    keeping the newest ``seen_min_keep`` rows of message identities.  Returns whether
    anything was evicted.  Raises StoreFullError (backpressure)."""
    used = used_bytes(con)
    if used + need <= max_bytes:
        return False
    target = int(max_bytes * 0.9) - need  # low-water mark: evict in rounds
    # message identities first: only the newest few commits can see redeliveries
    con.execute("DELETE FROM seen WHERE n <= (SELECT max(n) FROM seen) - ?", (seen_min_keep,))
    gone = True
    used = used_bytes(con)
    for synced in (1, 0):
        if synced == 0 and on_full != "drop_oldest":
            break
        while used > target:
            rows = con.execute(
                "SELECT seq, n, length(blob) FROM batches WHERE synced=? ORDER BY seq LIMIT 256",
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
            gone = True
            evicted.inc(count, str(synced))
            if not synced:
                dropped.inc(readings, "store", "quota")
                log.warning(
                    "store quota reached: dropped %d unsynced batch(es), %d reading(s), "
                    "up to seq %d (on_full: drop_oldest)",
                    count,
                    readings,
                    upto,
                )
            used = used_bytes(con)
        if used <= target:
            break
    if used > target and on_full == "drop_oldest":
        # readings are gone: dead letters are what is left to give way
        while used > target:
            rows = con.execute("SELECT seq FROM dead_letters ORDER BY seq LIMIT 64").fetchall()
            if not rows:
                break
            con.execute("DELETE FROM dead_letters WHERE seq<=?", (rows[-1][0],))
            dl_dropped.inc(len(rows))
            gone = True
            used = used_bytes(con)
    if used + need > max_bytes:
        why = (
            "nothing is left to evict"
            if on_full == "drop_oldest"
            else "unsynced data is kept (on_full: backpressure)"
        )
        raise StoreFullError(
            f"store quota of {max_bytes} bytes reached ({used} in use, {need} more needed); {why}"
        )
    return gone


def reclaim(con: sqlite3.Connection) -> None:
    """Return freed pages to the filesystem and leave no old WAL frame behind."""
    try:
        con.execute("PRAGMA incremental_vacuum").fetchall()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.Error as e:  # a reader holding the WAL: next round truncates
        log.debug("reclaim deferred: %s", e)
