"""Packed records (24 bytes each, :data:`core._model.RECORD`) between stages: the record
size and packed bytes -> :class:`Batch` without copying or converting."""

from __future__ import annotations

from core._errors import FilterRuntimeError
from core._model import RECORD, Batch

__all__ = ["REC", "unpack"]

REC = RECORD.size  # 24


def unpack(raw: bytes) -> Batch:
    """Packed records -> :class:`Batch` (the batch wraps ``raw``; no copy); bytes that are
    not whole records raise :class:`FilterRuntimeError` (code ``output_size``)."""
    if len(raw) % REC:
        raise FilterRuntimeError(
            f"{len(raw)} bytes of output are not whole {REC}-byte records", code="output_size"
        )
    return Batch.from_records(raw)
