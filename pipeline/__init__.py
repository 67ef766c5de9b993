"""edgepipe: edge IoT stream processing.

MQTT in, a chain of sandboxed WebAssembly filters, an encrypted local SQLite store,
batched uploads to the cloud.  The public surface is small; everything else is private
(``pipeline._*``) and imported lazily, so the edge process loads only what it uses.
"""

from __future__ import annotations

from typing import Any

from core._errors import (
    ConfigError,
    DecodeError,
    EdgepipeError,
    FilterError,
    FilterLoadError,
    FilterRuntimeError,
    IngestError,
    StoreError,
    StoreFullError,
    SyncError,
)
from core._model import Batch, DeadLetter, Flags, Reading, SeriesRegistry

__all__ = [
    "Batch",
    "ConfigError",
    "DeadLetter",
    "DecodeError",
    "EdgepipeError",
    "FilterError",
    "FilterLoadError",
    "FilterRuntimeError",
    "Flags",
    "IngestError",
    "Pipeline",
    "PipelineConfig",
    "Reading",
    "SeriesRegistry",
    "StoreError",
    "StoreFullError",
    "SyncError",
    "load_config",
]

_LAZY = {
    "Pipeline": ("._runtime", "Pipeline"),
    "PipelineConfig": ("config._models", "PipelineConfig"),
    "load_config": ("config._loader", "load_config"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod, __name__), attr)
    raise AttributeError(name)
