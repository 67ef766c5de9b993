"""edgepipe's sync worker: committed batches to the cloud receiver, exactly-once in effect.

The composition root (``pipeline._compose.sync_worker``) builds a :class:`SyncWorker` from
its collaborators: a :class:`Transport` (signed HTTP), a :class:`LinkMonitor` (which link
is up, from sysfs) and the path of its persisted :class:`SyncState`.  Loaded on first use,
so ``edgepipe status`` does not import the worker.
"""

from __future__ import annotations

from core._lazy import lazy_names

__all__ = [
    "BatchSource",
    "BundleAgent",
    "BundleApplier",
    "BundleState",
    "CannotApply",
    "HealthSampler",
    "LinkMonitor",
    "LogCollector",
    "SyncState",
    "SyncWorker",
    "Transport",
    "secret_bytes",
    "status_report",
]

_WHERE = {
    "BatchSource": "._worker",
    "BundleAgent": "._bundles",
    "BundleApplier": "._bundles",
    "BundleState": "._bundles",
    "CannotApply": "._bundles",
    "SyncWorker": "._worker",
    "LinkMonitor": "._link",
    "HealthSampler": "._health",
    "LogCollector": "._logs",
    "SyncState": "._state",
    "Transport": "._transport",
    "secret_bytes": "._transport",
    "status_report": "._status",
}


__getattr__ = lazy_names(__name__, _WHERE)
