"""edgepipe's sync worker: committed batches to the cloud receiver, exactly-once in effect.

The cloud receiver imports ``sync._signing`` only; the worker is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SyncWorker", "SyncStatus"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import _worker

        return getattr(_worker, name)
    raise AttributeError(name)
