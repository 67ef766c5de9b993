"""Device health: a compact snapshot taken on the sync worker's schedule, kept in the store
as a time series and uploaded with the batches (docs/health.md).

A snapshot is a flat map of integer gauges and counters (scaled integers, so that deltas
between snapshots are small and compress well): the process (CPU time, RSS from
``/proc/self/status``), the device (load, memory, temperature from ``/proc`` and
``/sys/class/thermal``), the store (bytes used against the quota, free disk, bytes written
to flash), the links (bytes sent today), MQTT (connected, sessions lost), the chain (per
stage records in and out, drops by reason, dead letters, traps by code, breaker state)
plus the active chain's hash, a text.  What the composition root knows and this package
may not import is passed in as ``extra`` collectors.

:func:`encode_health` packs a run of snapshots columnwise, every numeric column delta
encoded (first value absolute, then differences; ``nil`` where a key is absent, the next
value absolute again), inside the request body that zstd compresses as a whole.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack

from core._metrics import METRICS, Metrics

__all__ = [
    "HEALTH_KEYS_MAX",
    "HealthSampler",
    "encode_health",
    "metric_fields",
    "proc_fields",
]

#: Most keys one snapshot carries (the receiver refuses more); per stage keys beyond are cut.
HEALTH_KEYS_MAX = 256
#: Longest text value (the chain hash) in a snapshot.
TEXT_MAX = 128

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read(path: str | Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(65536).decode("ascii", "replace")
    except OSError:
        return None


def proc_fields(proc: Path = Path("/proc"), sys: Path = Path("/sys")) -> dict[str, int]:
    """The process and device fields ``/proc`` and ``/sys`` expose here (absent ones are
    left out): ``cpu_ms`` (user + system time of this process), ``rss_kb``, ``load1_x100``,
    ``mem_total_kb``, ``mem_avail_kb``, ``temp_mc`` (hottest thermal zone, millidegrees)."""
    out: dict[str, int] = {}
    status = _read(proc / "self" / "status")
    if status:
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
                break
    else:
        statm = _read(proc / "self" / "statm")
        if statm:
            out["rss_kb"] = int(statm.split()[1]) * _PAGE // 1024
    try:
        t = os.times()  # the process's own user and system time (no /proc/self/stat parsing)
        out["cpu_ms"] = int((t.user + t.system) * 1000)
    except OSError:
        pass
    load = _read(proc / "loadavg")
    if load:
        out["load1_x100"] = round(float(load.split()[0]) * 100)
    mem = _read(proc / "meminfo")
    if mem:
        for line in mem.splitlines():
            k, _, v = line.partition(":")
            if k == "MemTotal":
                out["mem_total_kb"] = int(v.split()[0])
            elif k == "MemAvailable":
                out["mem_avail_kb"] = int(v.split()[0])
    temps = []
    for p in sorted(glob.glob(str(sys / "class" / "thermal" / "thermal_zone*" / "temp")))[:16]:
        v = _read(p)
        if v and v.strip().lstrip("-").isdigit():
            temps.append(int(v.strip()))
    if temps:
        out["temp_mc"] = max(temps)
    return out


# metric -> (snapshot key prefix, labels that name it)
_METRIC_FIELDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("edgepipe_messages_received_total", "msgs_in", ()),
    ("edgepipe_readings_stored_total", "stored", ()),
    ("edgepipe_mqtt_sessions_lost_total", "sessions_lost", ()),
    ("edgepipe_mqtt_connects_total", "mqtt_connects", ()),
    ("edgepipe_store_bytes_written_total", "flash_written_b", ()),
    ("edgepipe_store_full", "store_full", ()),
    ("edgepipe_dead_letters_total", "dead_letters", ("stage",)),
    ("edgepipe_stage_records_total", "stage", ("stage", "direction")),
    ("edgepipe_readings_dropped_total", "drops", ("stage", "reason")),
    ("edgepipe_stage_errors_total", "traps", ("stage", "code")),
    ("edgepipe_stage_breaker_open", "breaker_open", ("stage",)),
)


def metric_fields(metrics: Metrics = METRICS) -> dict[str, int]:
    """The pipeline's counters as snapshot fields: ``stored``, ``sessions_lost``,
    ``stage:NAME:in``, ``drops:STAGE:REASON``, ``traps:STAGE:CODE``, ``breaker_open:STAGE``,
    ``dead_letters`` (total) and ``dead_letters:STAGE:REASON`` ..."""
    snap = metrics.snapshot()
    out: dict[str, int] = {}
    for name, prefix, _labels in _METRIC_FIELDS:
        values = snap.get(name)
        if not values:
            continue
        for labels, v in values.items():
            key = ":".join((prefix, *(x or "-" for x in labels)))
            out[key] = int(v)
        if prefix == "dead_letters":
            out["dead_letters"] = int(sum(values.values()))
    return out


class HealthSampler:
    """``sample(now_ms)`` -> one snapshot.  ``store_stats`` are the store's
    :meth:`~storage.Store.stats`, ``link_bytes`` the bytes sent today per link kind;
    ``extra`` collectors (``() -> dict``) add what the application knows (MQTT state, the
    chain's hash)."""

    def __init__(
        self,
        *,
        store_path: Path,
        extra: Iterable[Callable[[], dict[str, Any]]] = (),
        metrics: Metrics = METRICS,
        proc: Path = Path("/proc"),
        sys: Path = Path("/sys"),
    ) -> None:
        self.store_path = Path(store_path)
        self.extra = list(extra)
        self.metrics = metrics
        self.proc, self.sys = proc, sys

    def sample(
        self, now_ms: int, store_stats: dict[str, Any], link_bytes: dict[str, int]
    ) -> dict[str, Any]:
        snap: dict[str, Any] = {"ts": int(now_ms)}
        snap.update(proc_fields(self.proc, self.sys))
        snap["store_used_b"] = int(store_stats.get("used_bytes", 0))
        snap["store_disk_b"] = int(store_stats.get("disk_bytes", 0))
        snap["store_quota_b"] = int(store_stats.get("quota_bytes", 0))
        snap["backlog_readings"] = int(store_stats.get("unsynced_readings", 0))
        try:
            snap["disk_free_b"] = shutil.disk_usage(self.store_path.parent).free
        except OSError:
            pass
        for kind, n in sorted(link_bytes.items()):
            snap[f"link_bytes:{kind}"] = int(n)
        snap.update(metric_fields(self.metrics))
        for fn in self.extra:
            try:
                snap.update(fn())
            except Exception:  # a failing collector must not cost the snapshot
                continue
        if len(snap) > HEALTH_KEYS_MAX:  # many stages: keep the device-wide keys first
            keys = sorted(snap, key=lambda k: (k.count(":"), k))[:HEALTH_KEYS_MAX]
            snap = {k: snap[k] for k in keys}
        for k, v in list(snap.items()):
            if isinstance(v, str):
                snap[k] = v[:TEXT_MAX]
            elif isinstance(v, bool):
                snap[k] = int(v)
            elif not isinstance(v, int):
                snap[k] = int(v)
        return snap


def encode_health(records: list[tuple[int, dict[str, Any]]]) -> bytes:
    """Stored snapshots ``(seq, snapshot)`` as one msgpack block: ``{"seq": [...],
    "keys": [...], "cols": [[...], ...]}``, ``seq`` and every integer column delta encoded;
    a text column (the chain hash) carries its value where it changes and nil elsewhere."""
    keys: list[str] = []
    index: dict[str, int] = {}
    for _, snap in records:
        for k in snap:
            if k not in index:
                index[k] = len(keys)
                keys.append(k)
    seqs = _delta([seq for seq, _ in records])
    cols = []
    for k in keys:
        raw = [snap.get(k) for _, snap in records]
        if any(isinstance(v, str) for v in raw):
            col, prev = [], None
            for v in raw:
                v = v if isinstance(v, str) else None
                col.append(v if v != prev else None)
                prev = v if v is not None else prev
            cols.append(col)
        else:
            cols.append(_delta(raw))
    return msgpack.packb({"seq": seqs, "keys": keys, "cols": cols}, use_bin_type=True)


def _delta(values: list[int | None]) -> list[int | None]:
    out: list[int | None] = []
    prev: int | None = None
    for v in values:
        if v is None:
            out.append(None)
        else:
            out.append(v if prev is None else v - prev)
        prev = v
    return out


def decode_delta(col: list[int | None]) -> list[int | None]:
    """The inverse of the delta encoding of one column."""
    out: list[int | None] = []
    prev: int | None = None
    for d in col:
        if d is None:
            out.append(None)
            prev = None
        else:
            prev = d if prev is None else prev + d
            out.append(prev)
    return out
