"""The "sync" section of ``edgepipe status``: read from the state file the worker persists and
from the store's batch table (counts only: no key needed, nothing decrypted)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from ._state import SyncState, default_state_path, utc_day

__all__ = ["backlog_counts", "state_path_for", "status_section"]


def state_path_for(cfg: Any) -> Path:
    """The sync state file of the pipeline configured by ``cfg`` (a PipelineConfig)."""
    if cfg.sync.state_file is not None:
        return cfg.resolve(Path(cfg.sync.state_file))
    return default_state_path(cfg.resolve(cfg.store.path))


def backlog_counts(store_path: Path) -> dict[str, Any] | None:
    """Unsynced batches/readings and the oldest unsynced reading time, read-only."""
    if not store_path.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=5)
        try:
            b, r, oldest = con.execute(
                "SELECT count(*), coalesce(sum(n), 0), min(t_min) FROM batches WHERE synced=0"
            ).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return {"backlog_batches": b, "backlog_readings": r, "oldest_unsynced_ms": oldest}


async def status_section(cfg: Any) -> dict[str, Any]:
    """``{"enabled", "url", "backlog_batches", "backlog_readings", "oldest_unsynced_ms",
    "last_success_ms", "last_error", "last_error_ms", "link", "online", "waiting",
    "bytes_today": {link: bytes}, "day"}`` for ``edgepipe status``."""
    import asyncio

    st = SyncState.load(state_path_for(cfg))
    counts = await asyncio.to_thread(backlog_counts, cfg.resolve(cfg.store.path))
    today = utc_day()
    out: dict[str, Any] = {
        "enabled": cfg.sync.enabled,
        "url": cfg.sync.url,
        "backlog_batches": st.backlog_batches,
        "backlog_readings": st.backlog_readings,
        "oldest_unsynced_ms": st.oldest_unsynced_ms,
        "last_success_ms": st.last_success_ms,
        "last_error": st.last_error,
        "last_error_ms": st.last_error_ms,
        "link": st.link,
        "interface": st.interface,
        "online": st.online,
        "waiting": st.waiting,
        "day": today,
        "bytes_today": dict(st.bytes_today) if st.day == today else {},
        "readings_sent_total": st.readings_sent_total,
    }
    if counts is not None:
        out.update(counts)
    if st.last_success_ms:
        out["last_success_age_s"] = round(time.time() - st.last_success_ms / 1000, 1)
    return out
