"""edgepipe: edge IoT stream processing.

MQTT in, a chain of sandboxed WebAssembly filters, an encrypted local SQLite store,
batched uploads to the cloud.  The public surface is small; everything else is private
(``pipeline._*``) and imported lazily, so the edge process loads only what it uses.
"""

from __future__ import annotations

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
from core._lazy import lazy_names
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

__getattr__ = lazy_names(
    __name__,
    {
        "Pipeline": "._runtime",
        "PipelineConfig": "config._models",
        "load_config": "config._loader",
    },
)
