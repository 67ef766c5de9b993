"""A Bloom filter over the message identities in the ``seen`` table, so that looking up
possible redeliveries does not unpack every stored identity for every batch.

After a (re)connect every message of the redelivery window is looked up
(docs/ingest.md, "Redeliveries"); during a backlog drain that is every message of the
first seconds, and each lookup used to read all ``seen`` rows (up to ``SEEN_KEEP`` commits
of up to a batch of identities each) newest first -- all of them whenever nothing is found,
which is the normal case.  The filter answers "certainly not stored" for almost every key
from four bits; the rare key it cannot rule out (stored, or a false positive, about 1 in
70,000 at its capacity) is looked up in the table as before.  So the answer stays exact.

The filter exists only while lookups happen: it is built from the table at the first
lookup, sized for twice the identities the table holds then (64 bits an identity, from
32 KiB to 1 MiB), kept up to date by every commit after it, and dropped (its memory freed)
after :data:`IDLE_COMMITS` commits without a lookup, or when more identities went in than
its size is for (rows the table forgot stay set in a filter; the next lookup builds a
fresh one, for the table as it is then).  Identities are keyed BLAKE2b output, uniformly distributed, so the four
probes are the low bits of the identity's own four 32-bit words (a key of another length
is cut or zero-padded to 16 bytes first).  All of it runs on the store's worker thread.

The bits live behind a two-call interface (:class:`Bits`: add and test the identities of
a batch joined in one buffer).  :class:`PyBits` is a ``bytearray`` and a Python loop per
identity (about 11,000 instructions per identity for a test and an insert in CPython 3.11);
the edge process passes the ingest kernel's (``pipeline.ingest._kernel.BloomBits``: the
same bits and probes in a Wasm instance of its own, one call per batch, ~30 ns an
identity), which the store cannot import itself (the layers point down).
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Callable, Iterable
from itertools import compress
from typing import Protocol

import msgpack

__all__ = ["CAPACITY", "IDLE_COMMITS", "Bits", "PyBits", "SeenFilter", "size_for"]

_BITS = 23  # at most 2**23 bits = 1 MiB
_MIN_BITS = 18  # at least 2**18 bits = 32 KiB
_MASK = (1 << _BITS) - 1
#: identities added before the filter is rebuilt: 64 bits each and 4 probes, about one
#: false positive per 70,000 lookups when full
CAPACITY = (1 << _BITS) // 64
#: commits without a lookup after which the filter is dropped
IDLE_COMMITS = 64
#: the four probes: the low bits of the identity's four 32-bit words
_words = struct.Struct("<4I").unpack_from


def size_for(identities: int) -> int:
    """log2 of the bits for a filter that will hold up to ``identities`` (64 bits each)."""
    log2 = _MIN_BITS
    while log2 < _BITS and (1 << log2) < 64 * identities:
        log2 += 1
    return log2


class Bits(Protocol):
    """A Bloom filter's ``2**log2`` bits (the probes are the low ``log2`` bits of an
    identity's four 32-bit words); ``keys`` are 16-byte identities joined in one buffer."""

    def add(self, keys: bytes) -> None: ...

    def test(self, keys: bytes) -> bytes:
        """One byte per identity: 1 if all four of its bits are set."""
        ...

    def close(self) -> None: ...


class PyBits:
    """:class:`Bits` in a ``bytearray``, a Python loop per identity (the reference)."""

    __slots__ = ("_b", "_mask")

    def __init__(self, log2: int = _BITS) -> None:
        self._b = bytearray(1 << (log2 - 3))
        self._mask = (1 << log2) - 1

    def add(self, keys: bytes) -> None:
        if self._b:
            _add(self._b, (keys[i : i + 16] for i in range(0, len(keys), 16)), self._mask)

    def test(self, keys: bytes) -> bytes:
        bits = self._b
        if not bits:  # closed: every identity may be stored
            return b"\1" * (len(keys) // 16)
        out = bytearray(len(keys) // 16)
        mask = self._mask
        for i in range(len(out)):
            a, b, c, d = _words(keys, 16 * i)
            a &= mask
            if bits[a >> 3] >> (a & 7) & 1:
                b &= mask
                if bits[b >> 3] >> (b & 7) & 1:
                    c &= mask
                    if bits[c >> 3] >> (c & 7) & 1:
                        d &= mask
                        out[i] = bits[d >> 3] >> (d & 7) & 1
        return bytes(out)

    def close(self) -> None:
        self._b = bytearray()


def _joined(keys: list[bytes]) -> bytes:
    """The identities in one buffer, 16 bytes each (another length cut or zero-padded)."""
    out = b"".join(keys)
    if len(out) != 16 * len(keys):
        out = b"".join(k if len(k) == 16 else _pad(k) for k in keys)
    return out


class SeenFilter:
    __slots__ = ("_bits", "_count", "_idle", "_limit", "_new")

    def __init__(self, bits: Callable[[int], Bits] = PyBits) -> None:
        self._new = bits
        self._bits: Bits | None = None
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
        return self._probe(bits, want)

    def probe(self, want: set[bytes]) -> set[bytes] | None:
        """:meth:`candidates` without the table: None when there is no filter.  Safe on
        another thread than the one committing: a commit only sets bits, and bits closed
        by a drop meanwhile answer "maybe" for every identity, so the answer covers every
        identity committed before the commit running now."""
        bits = self._bits
        if bits is None:
            return None
        return self._probe(bits, want)

    def _probe(self, bits: Bits, want: set[bytes]) -> set[bytes]:
        self._idle = 0
        keys = list(want)
        return set(compress(keys, bits.test(_joined(keys))))

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
        bits.add(_joined(keys))

    def drop(self) -> None:
        if self._bits is not None:
            self._bits.close()
        self._bits = None
        self._count = 0
        self._idle = 0

    def _build(self, con: sqlite3.Connection) -> Bits:
        # the identities stored, from the rows' sizes (msgpack: 18 bytes an identity)
        rows, size = con.execute(
            "SELECT count(*), coalesce(sum(length(ids)), 0) FROM seen"
        ).fetchone()
        log2 = size_for(2 * max(size // 18, rows))
        bits = self._new(log2)
        count = 0
        for (ids,) in con.execute("SELECT ids FROM seen"):
            keys = msgpack.unpackb(ids)
            bits.add(_joined(keys))
            count += len(keys)
        # a table already past the capacity (very large batches): more false positives,
        # each looked up in the table; rebuilt once it has doubled
        self._bits, self._count, self._idle = bits, count, 0
        self._limit = (1 << log2) // 64 if log2 < _BITS else max(CAPACITY, 2 * count)
        return bits


def _pad(key: bytes) -> bytes:
    return key[:16].ljust(16, b"\0")


def _add(bits: bytearray, keys: Iterable[bytes], mask: int = _MASK) -> None:
    for key in keys:
        a, b, c, d = _words(key)
        a &= mask
        bits[a >> 3] |= 1 << (a & 7)
        b &= mask
        bits[b >> 3] |= 1 << (b & 7)
        c &= mask
        bits[c >> 3] |= 1 << (c & 7)
        d &= mask
        bits[d >> 3] |= 1 << (d & 7)
