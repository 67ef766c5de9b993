"""Rows of the store: which tables hold sealed rows, how a row's id enters its AAD, and a
batch's sealed plaintext (msgpack columns, zstd-compressed when that pays)."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

from core._errors import TamperedError
from core._model import Batch
from protocol._keys import Sealer

__all__ = ["SEALED", "aad_row", "open_batch", "pack_batch", "stage_id", "unpack_batch"]

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
    """A batch's sealed plaintext: msgpack of its columns, zstd-compressed when larger than
    a few hundred bytes (a zstd frame never starts like a msgpack array, so both forms read
    back; rows written before compression stay readable)."""
    plain = msgpack.packb([batch.series, batch.ts, batch.value, batch.flags])
    if len(plain) < 512:
        return plain
    packed = _zstd_codec()[0].compress(plain)
    return packed if len(packed) < len(plain) else plain


def unpack_batch(plain: bytes, seq: int) -> list[Any]:
    if plain[:4] == _ZSTD_MAGIC:
        # authenticated already; the bound only guards against a bug, not an attacker
        plain = _zstd_codec()[1].decompress(plain, max_output_size=64 << 20)
    cols = msgpack.unpackb(plain)
    if not (isinstance(cols, list) and len(cols) == 4):
        raise TamperedError(f"batches row {seq}: not a batch", table="batches", seq=seq)
    return cols


def open_batch(
    sealer: Sealer,
    seq: int,
    kid: str,
    blob: bytes,
    n: int | None = None,
    span: tuple | None = None,
) -> Batch:
    """Decrypt a ``batches`` row; its clear columns (count ``n``, time ``span``) must match."""
    series, ts, value, flags = unpack_batch(sealer.open("batches", seq, kid, blob), seq)
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
