"""The "sync" section of ``edgepipe status``: the state file the worker persists (last
success, last error, bytes per link today) and the backlog from the open store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ._state import SyncState, default_state_path, utc_day

__all__ = ["state_path_for", "status_section"]


def state_path_for(cfg: Any) -> Path:
    """The sync state file of the pipeline configured by ``cfg`` (a PipelineConfig)."""
    if cfg.sync.state_file is not None:
        return cfg.resolve(Path(cfg.sync.state_file))
    return default_state_path(cfg.resolve(cfg.store.path))


async def status_section(ctx: Any) -> dict[str, Any]:
    """Section provider for ``edgepipe status`` (``ctx.cfg``, ``ctx.store``)."""
    cfg = ctx.cfg
    st = SyncState.load(state_path_for(cfg))
    out: dict[str, Any] = {"enabled": cfg.sync.enabled, "url": cfg.sync.url}
    if ctx.store is not None:
        s = await ctx.store.stats()
        out["backlog_batches"] = s["unsynced_batches"]
        out["backlog_readings"] = s["unsynced_readings"]
        out["oldest_unsynced_ms"] = s["oldest_unsynced_ms"]
    else:
        out["backlog_batches"] = st.backlog_batches
        out["backlog_readings"] = st.backlog_readings
        out["oldest_unsynced_ms"] = st.oldest_unsynced_ms
    out["last_success_ms"] = st.last_success_ms
    out["last_success_age_s"] = (
        round(time.time() - st.last_success_ms / 1000, 1) if st.last_success_ms else None
    )
    out["last_error"] = st.last_error
    out["last_error_at_ms"] = st.last_error_ms
    out["link"] = st.link + (f" ({st.interface})" if st.interface else "")
    out["online"] = st.online
    out["waiting"] = st.waiting
    today = st.bytes_today if st.day == utc_day() else {}
    for link in sorted(set(today) | {"wifi", "cellular", "ethernet"}):
        out[f"sent_today_{link}_bytes"] = today.get(link, 0)
    if "unknown" in today:
        out["sent_today_unknown_bytes"] = today["unknown"]
    out["readings_sent_total"] = st.readings_sent_total
    return out
