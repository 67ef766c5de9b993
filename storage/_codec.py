"""Rows of the store: which tables hold sealed rows, how a row's id enters its AAD, and a
batch's sealed plaintext (its four columns as packed little-endian arrays, zstd-compressed
when that pays; rows written as msgpack columns by earlier versions stay readable)."""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import msgpack

from core._errors import TamperedError
from core._model import Batch
from protocol._keys import Sealer

__all__ = [
    "SEALED",
    "aad_row",
    "batch_span",
    "open_batch",
    "pack_batch",
    "stage_id",
    "unpack_batch",
]

#: Tables whose rows are sealed: (table, primary key column).
SEALED = (
    ("secrets", "name"),
    ("series", "id"),
    ("filter_state", "id"),
    ("dead_letters", "seq"),
    ("batches", "seq"),
    ("health", "seq"),
    ("logs", "seq"),
)

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: First byte of the packed-columns form: 0xc1 is never used by msgpack, so it can never
#: be mistaken for the msgpack form (nor for a zstd frame).
_COLUMNS = b"\xc1"
_LITTLE = sys.byteorder == "little"
_zstd: list[Any] = []


def _zstd_codec() -> tuple[Any, Any]:
    if not _zstd:
        import zstandard

        _zstd[:] = [zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()]
    return _zstd[0], _zstd[1]


def aad_row(v: Any) -> int | str:
    """A primary key as it enters the AAD (a BLOB key as hex)."""
    return v.hex() if isinstance(v, bytes) else v


def stage_id(ident: bytes, stage: str) -> bytes:
    """The ``filter_state`` row id of a stage: a keyed hash, so stage names stay sealed."""
    return hashlib.blake2b(
        stage.encode(), key=ident, person=b"edgepipe-stage", digest_size=16
    ).digest()


def pack_batch(batch: Batch) -> bytes:
    """A batch's sealed plaintext: ``0xc1`` then its columns ts (i64), value (f64), series
    (u32), flags (u32) as little-endian arrays, copied out of the packed records at C
    speed; zstd-compressed when larger than a few hundred bytes (a zstd frame never starts
    with 0xc1, so both forms read back)."""
    if _LITTLE:
        plain = b"".join(
            (
                _COLUMNS,
                batch.column("ts").tobytes(),  # type: ignore[attr-defined]
                batch.column("value").tobytes(),  # type: ignore[attr-defined]
                batch.column("series").tobytes(),  # type: ignore[attr-defined]
                batch.column("flags").tobytes(),  # type: ignore[attr-defined]
            )
        )
    else:
        plain = msgpack.packb([batch.series, batch.ts, batch.value, batch.flags])
    if len(plain) < 512:
        return plain
    packed = _zstd_codec()[0].compress(plain)
    return packed if len(packed) < len(plain) else plain


def _not_a_batch(seq: int) -> TamperedError:
    return TamperedError(f"batches row {seq}: not a batch", table="batches", seq=seq)


def unpack_batch(plain: bytes, seq: int) -> Batch:
    """The batch in a sealed plaintext (either form, compressed or not)."""
    if plain[:4] == _ZSTD_MAGIC:
        # authenticated already; the bound only guards against a bug, not an attacker
        plain = _zstd_codec()[1].decompress(plain, max_output_size=64 << 20)
    if plain[:1] == _COLUMNS:
        n, rest = divmod(len(plain) - 1, 24)
        if rest:
            raise _not_a_batch(seq)
        if not _LITTLE:
            return _from_lists(plain, n)
        cols = memoryview(plain)[1:]
        buf = bytearray(24 * n)
        mv = memoryview(buf)
        q, d, u = mv.cast("q"), mv.cast("d"), mv.cast("I")
        q[0::3] = cols[: 8 * n].cast("q")
        d[1::3] = cols[8 * n : 16 * n].cast("d")
        u[4::6] = cols[16 * n : 20 * n].cast("I")
        u[5::6] = cols[20 * n :].cast("I")
        return Batch.from_records(bytes(buf))
    cols = msgpack.unpackb(plain)
    if not (isinstance(cols, list) and len(cols) == 4):
        raise _not_a_batch(seq)
    series, ts, value, flags = cols
    return Batch(ts, value, series, flags)


def _from_lists(plain: bytes, n: int) -> Batch:
    """The packed-columns form on a big-endian host (byte-swapped column by column)."""
    from array import array

    cols = []
    for code, start, size in (("q", 0, 8), ("d", 8, 8), ("I", 16, 4), ("I", 20, 4)):
        a = array(code)
        a.frombytes(plain[1 + start * n : 1 + (start + size) * n])
        a.byteswap()
        cols.append(a)
    return Batch(cols[0], cols[1], cols[2], cols[3])


def open_batch(
    sealer: Sealer,
    seq: int,
    kid: str,
    blob: bytes,
    n: int | None = None,
    span: tuple | None = None,
) -> Batch:
    """Decrypt a ``batches`` row; its clear columns (count ``n``, time ``span``) must match."""
    batch = unpack_batch(sealer.open("batches", seq, kid, blob), seq)
    if (n is not None and n != len(batch)) or (
        span is not None and len(batch) and span != batch_span(batch)
    ):
        raise TamperedError(
            f"batches row {seq}: its clear columns (count, time range) do not match its "
            "sealed contents",
            table="batches",
            seq=seq,
        )
    return batch


def batch_span(batch: Batch) -> tuple[int, int]:
    """(oldest, newest) timestamp of a non-empty batch, from its column view."""
    ts = batch.column("ts")
    return min(ts), max(ts)
