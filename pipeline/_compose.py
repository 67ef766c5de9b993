"""The composition root: the one place that turns ``pipeline.yaml`` sections into runtime
objects and hands each component what it needs.

Components below this module never see the whole :class:`~config._models.PipelineConfig`:
each gets its own typed section, resolved paths and its collaborators (the store gets a
keyring, the sync worker a transport, a link monitor and its state; the MQTT client the
decoder's topic filters).  Path resolution against the config file's directory happens
here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

from config._models import PipelineConfig
from core._errors import ConfigError
from protocol._keys import Keyring
from storage import Store

__all__ = ["keyring", "open_store", "store_path", "sync_state_path"]


def store_path(cfg: PipelineConfig) -> Path:
    return cfg.resolve(cfg.store.path)


def sync_state_path(cfg: PipelineConfig) -> Path:
    """The sync worker's state file: ``sync.state_file``, else beside the store."""
    if cfg.sync.state_file is not None:
        return cfg.resolve(Path(cfg.sync.state_file))
    p = store_path(cfg)
    return p.with_name(p.name + ".sync.json")


def keyring(cfg: PipelineConfig) -> Keyring:
    if cfg.store.key is None:
        raise ConfigError("store.key is required (a keyring file, env var or secret)")
    return Keyring.from_secret(cfg.store.key)


async def open_store(cfg: PipelineConfig, *, create: bool = True) -> Store:
    """The encrypted store of ``cfg`` (``create=False`` for tools: a missing store is an
    error, not a new empty one)."""
    sc = cfg.store
    return await Store.open(
        store_path(cfg),
        keyring(cfg),
        device_id=cfg.device.id,
        quota_bytes=int(sc.quota_mb * 1024 * 1024),
        on_full=sc.on_full,
        synchronous=sc.synchronous,
        create=create,
    )
