"""The redelivery filter's bits: the ingest kernel's (one Wasm call per batch) and the
store's Python reference answer alike, bit for bit, and a closed one answers "maybe" for
every identity (so the caller looks them all up: never a redelivery taken as new)."""

from __future__ import annotations

import random
import sqlite3

import msgpack
import pytest

from pipeline.ingest._kernel import BloomBits
from storage._seenfilter import PyBits, SeenFilter, size_for

BACKENDS = {"python": PyBits, "kernel": BloomBits}


def _keys(rng: random.Random, n: int) -> list[bytes]:
    return [rng.randbytes(16) for _ in range(n)]


@pytest.mark.parametrize("log2", [18, 20, 23])
def test_kernel_and_python_bits_agree_bit_for_bit(log2: int) -> None:
    rng = random.Random(7)
    py, wasm = PyBits(log2), BloomBits(log2)
    added: list[bytes] = []
    for _ in range(6):  # several batches, of several sizes (one over the add chunk)
        batch = _keys(rng, rng.choice((1, 37, 500, 5000)))
        added += batch
        joined = b"".join(batch)
        py.add(joined)
        wasm.add(joined)
    probe = added[::3] + _keys(rng, 20_000)
    # words whose low 23 bits collide with added ones but differ above: only the low bits
    # count in both
    probe += [bytes(b ^ 0x80 if i % 4 == 3 else b for i, b in enumerate(k)) for k in added[:50]]
    joined = b"".join(probe)
    got_py, got_wasm = py.test(joined), wasm.test(joined)
    assert got_py == got_wasm
    assert all(got_wasm[: len(added[::3])])  # no false negatives
    fp = sum(got_wasm[len(added[::3]) : len(added[::3]) + 20_000])
    if log2 == 23:
        assert fp < 20  # ~11,000 of 131,072 identities in: false positives are rare
    wasm.close()
    wasm.close()  # idempotent


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_closed_bits_answer_maybe_for_every_identity(backend: str) -> None:
    bits = BACKENDS[backend](18)
    bits.close()
    bits.add(b"\0" * 32)  # nothing to set once closed, and no error
    assert bits.test(b"\1" * 48) == b"\1\1\1"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_the_filter_finds_every_stored_identity_with_either_bits(backend: str) -> None:
    rng = random.Random(11)
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE seen (n INTEGER PRIMARY KEY, ids BLOB)")
    stored = [_keys(rng, 300) for _ in range(4)]
    stored.append([b"short", b"x" * 20])  # identities of another length: cut or padded
    for ids in stored:
        con.execute("INSERT INTO seen (ids) VALUES (?)", (msgpack.packb(ids),))
    f = SeenFilter(BACKENDS[backend])
    flat = [k for ids in stored for k in ids]
    fresh = _keys(rng, 2000)
    got = f.candidates(con, set(flat[::7] + fresh))
    assert set(flat[::7]) <= got
    assert len(got - set(flat[::7])) < 5
    later = _keys(rng, 100)
    f.committed(later)
    assert set(later) <= f.candidates(con, set(later))
    f.drop()
    assert not f.active


def test_the_filter_is_sized_to_the_table_and_rebuilt_bigger_when_it_fills() -> None:
    assert size_for(0) == 18 and size_for(4096) == 18 and size_for(4097) == 19
    assert size_for(10**9) == 23  # at most 1 MiB
    rng = random.Random(3)
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE seen (n INTEGER PRIMARY KEY, ids BLOB)")
    made: list[int] = []

    def bits(log2: int) -> BloomBits:
        made.append(log2)
        return BloomBits(log2)

    f = SeenFilter(bits)
    first = _keys(rng, 500)
    con.execute("INSERT INTO seen (ids) VALUES (?)", (msgpack.packb(first),))
    assert set(first) <= f.candidates(con, set(first))
    assert made == [18]  # 500 stored: the smallest filter (room for 4,096)
    stored = list(first)
    for _ in range(10):  # commits fill it past its size: it is dropped...
        batch = _keys(rng, 500)
        con.execute("INSERT INTO seen (ids) VALUES (?)", (msgpack.packb(batch),))
        f.committed(batch)
        stored += batch
    assert not f.active
    # ...and the next lookup builds one for the table as it is now, which finds all
    assert set(stored) <= f.candidates(con, set(stored))
    assert made == [18, size_for(2 * len(stored))] and made[1] > 18
