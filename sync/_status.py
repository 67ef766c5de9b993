"""The "sync" section of ``edgepipe status``: the state file the worker persists (last
success, last error, bytes per link today) and the backlog from the open store."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from config._models import SyncConfig
from core._clock import utc_day

from ._state import SyncState

__all__ = ["status_report"]


def status_report(
    cfg: SyncConfig, st: SyncState, backlog: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The "sync" section of ``edgepipe status``: the worker's persisted state ``st``, with
    the backlog from the store's ``stats()`` when the store exists (else as last saved).

    The backlog is the one edgepipe shows everywhere: readings stored and not yet
    acknowledged by the receiver -- ``edgepipe_sync_backlog_readings`` on ``/metrics``, the
    demo's status line, and what each upload reports to the dashboard (as of that upload's
    acknowledgement)."""
    out: dict[str, Any] = {"enabled": cfg.enabled, "url": cfg.url}
    if backlog is not None:
        out["backlog_batches"] = backlog["unsynced_batches"]
        out["backlog_readings"] = backlog["unsynced_readings"]
        out["oldest_unsynced_ms"] = backlog["oldest_unsynced_ms"]
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
