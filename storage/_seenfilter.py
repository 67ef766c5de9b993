"""A Bloom filter over the message identities in the ``seen`` table, so that looking up
possible redeliveries does not unpack every stored identity for every batch.

After a (re)connect every message of the redelivery window is looked up
(docs/ingest.md, "Redeliveries"); during a backlog drain that is every message of the
first seconds, and each lookup used to read all ``seen`` rows (up to ``SEEN_KEEP`` commits
of up to a batch of identities each) newest first -- all of them whenever nothing is found,
which is the normal case.  The filter answers "certainly not stored" for almost every key
from a few bits; the rare key it cannot rule out (stored, or a false positive, about 1 in
16,000 at its capacity) is looked up in the table as before.  So the answer stays exact.

The filter exists only while lookups happen: it is built from the table at the first
lookup, kept up to date by every commit after it, and dropped (its 512 KiB freed) after
:data:`IDLE_COMMITS` commits without a lookup, or when more identities than
:data:`CAPACITY` went in (rows the table forgot stay set in a filter; the next lookup builds
a fresh one).  A key of any length works (probes of a short one are just less spread).  Identities are keyed BLAKE2b output, uniformly distributed, so the probes
are slices of the identity's own bits.  All of it runs on the store's worker thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

import msgpack

__all__ = ["CAPACITY", "IDLE_COMMITS", "SeenFilter"]

_BITS = 22  # 2**22 bits = 512 KiB
_MASK = (1 << _BITS) - 1
#: identities added before the filter is rebuilt: 32 bits each and 5 probes, about one
#: false positive per 16,000 lookups when full
CAPACITY = (1 << _BITS) // 32
#: commits without a lookup after which the filter is dropped
IDLE_COMMITS = 64
_from_bytes = int.from_bytes


class SeenFilter:
    __slots__ = ("_bits", "_count", "_idle", "_limit")

    def __init__(self) -> None:
        self._bits: bytearray | None = None
        self._count = 0
        self._idle = 0
        self._limit = CAPACITY

    @property
    def active(self) -> bool:
        return self._bits is not None

    def candidates(self, con: sqlite3.Connection, want: set[bytes]) -> set[bytes]:
        """The identities of ``want`` that may be stored (a superset of those that are);
        builds the filter from the ``seen`` table first if there is none."""
        bits = self._bits
        if bits is None:
            bits = self._build(con)
        self._idle = 0
        out = set()
        for key in want:
            h = _from_bytes(key, "little")
            b = h & _MASK
            if not bits[b >> 3] >> (b & 7) & 1:
                continue
            b = (h >> 22) & _MASK
            if not bits[b >> 3] >> (b & 7) & 1:
                continue
            b = (h >> 44) & _MASK
            if not bits[b >> 3] >> (b & 7) & 1:
                continue
            b = (h >> 66) & _MASK
            if not bits[b >> 3] >> (b & 7) & 1:
                continue
            b = (h >> 88) & _MASK
            if not bits[b >> 3] >> (b & 7) & 1:
                continue
            out.add(key)
        return out

    def committed(self, keys: list[bytes]) -> None:
        """``keys`` are now in the table (call after the commit)."""
        bits = self._bits
        if bits is None:
            return
        self._idle += 1
        self._count += len(keys)
        if self._idle > IDLE_COMMITS or self._count > self._limit:
            self.drop()
            return
        _add(bits, keys)

    def drop(self) -> None:
        self._bits = None
        self._count = 0
        self._idle = 0

    def _build(self, con: sqlite3.Connection) -> bytearray:
        bits = bytearray(1 << (_BITS - 3))
        count = 0
        for (ids,) in con.execute("SELECT ids FROM seen"):
            keys = msgpack.unpackb(ids)
            _add(bits, keys)
            count += len(keys)
        # a table already past the capacity (very large batches): more false positives,
        # each looked up in the table; rebuilt once it has doubled
        self._bits, self._count, self._idle = bits, count, 0
        self._limit = max(CAPACITY, 2 * count)
        return bits


def _add(bits: bytearray, keys: Iterable[bytes]) -> None:
    for key in keys:
        h = _from_bytes(key, "little")
        b = h & _MASK
        bits[b >> 3] |= 1 << (b & 7)
        b = (h >> 22) & _MASK
        bits[b >> 3] |= 1 << (b & 7)
        b = (h >> 44) & _MASK
        bits[b >> 3] |= 1 << (b & 7)
        b = (h >> 66) & _MASK
        bits[b >> 3] |= 1 << (b & 7)
        b = (h >> 88) & _MASK
        bits[b >> 3] |= 1 << (b & 7)
