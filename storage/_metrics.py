"""The store's metrics, registered in one place (the order of docs/metrics.md)."""

from __future__ import annotations

from core._metrics import METRICS

committed = METRICS.counter("edgepipe_store_batches_total", "batches committed to the store")
stored = METRICS.counter("edgepipe_readings_stored_total", "readings durably stored")
dropped = METRICS.counter(
    "edgepipe_readings_dropped_total",
    "Readings dropped, by stage and reason (filtered, aggregated, dead_letter; stage store: quota)",
    ["stage", "reason"],
)
dl_dropped = METRICS.counter(
    "edgepipe_dead_letters_dropped_total", "dead letters evicted to stay within the quota"
)
evicted = METRICS.counter(
    "edgepipe_store_evicted_batches_total", "batches evicted to stay within the quota", ["synced"]
)
written = METRICS.counter(
    "edgepipe_store_bytes_written_total",
    "bytes SQLite wrote to the filesystem (WAL frames, checkpoints, vacuum): flash wear",
)
per_reading = METRICS.gauge(
    "edgepipe_store_bytes_written_per_reading", "bytes written per stored reading (since start)"
)
key_seals = METRICS.gauge(
    "edgepipe_store_key_seals", "encryptions made with the active store key (rotate before 2**30)"
)
