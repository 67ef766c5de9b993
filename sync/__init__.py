"""edgepipe's sync worker: committed batches to the cloud receiver, exactly-once in effect.

The cloud receiver imports ``sync._signing`` only; the worker is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SyncState", "SyncWorker"]


def __getattr__(name: str) -> Any:
    if name == "SyncWorker":
        from ._worker import SyncWorker

        return SyncWorker
    if name == "SyncState":
        from ._state import SyncState

        return SyncState
    raise AttributeError(name)
