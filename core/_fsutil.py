"""Crash-safe file replacement: the chain deployer, the key tools, the sync state."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: a new file (mode 0600) written and fsynced beside it,
    renamed over it, and the directory fsynced, so a crash or power cut leaves the old or
    the new file, never half of one.  Raises ``OSError`` with nothing changed.

    ``durable=False`` skips both fsyncs, for advisory files rewritten often (a crash still
    leaves the old or the new file; a power cut may leave the old one or an empty one): each
    fsync is a flash write on a device whose eMMC wears."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not durable:
        return
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
