"""Packed records (24 bytes each, :data:`core._model.RECORD`) between stages: the record
size and packed bytes -> :class:`Batch` without copying or converting."""

from __future__ import annotations

from core._model import RECORD, Batch

__all__ = ["REC", "unpack"]

REC = RECORD.size  # 24


def unpack(raw: bytes) -> Batch:
    """Packed records -> :class:`Batch` (the batch wraps ``raw``; no copy)."""
    return Batch.from_records(raw)
