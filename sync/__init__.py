"""edgepipe's sync worker: committed batches to the cloud receiver, exactly-once in effect.

The cloud receiver imports ``protocol._signing`` only; the worker is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SyncState", "SyncWorker", "status_report"]


def __getattr__(name: str) -> Any:
    if name == "SyncWorker":
        from ._worker import SyncWorker

        return SyncWorker
    if name == "status_report":
        from ._status import status_report

        return status_report
    if name == "SyncState":
        from ._state import SyncState

        return SyncState
    raise AttributeError(name)
