"""The filter chain's metrics, per stage (their meaning is in docs/metrics.md)."""

from __future__ import annotations

from core._metrics import METRICS

__all__ = [
    "BREAKER",
    "DEAD",
    "DROPPED",
    "EMITTED",
    "ERRORS",
    "FAILING",
    "QUARANTINED",
    "RECORDS",
    "RECYCLED",
    "SECONDS",
    "STATE_DROPPED",
]

RECORDS = METRICS.counter(
    "edgepipe_stage_records_total",
    "Records into and out of each filter stage",
    ("stage", "direction"),
)
DROPPED = METRICS.counter(
    "edgepipe_readings_dropped_total",
    "Readings dropped, by stage and reason (filtered, aggregated, dead_letter; stage store: quota)",
    ("stage", "reason"),
)
EMITTED = METRICS.counter(
    "edgepipe_readings_emitted_total",
    "Readings created by a stage (aggregates, expansions): "
    "in = dropped (but stage store) + in_flight + stored - emitted",
    ("stage",),
)
ERRORS = METRICS.counter(
    "edgepipe_stage_errors_total", "Filter stage failures, by trap/error code", ("stage", "code")
)
BREAKER = METRICS.gauge(
    "edgepipe_stage_breaker_open", "1 while a stage's circuit breaker is tripped", ("stage",)
)
SECONDS = METRICS.counter(
    "edgepipe_stage_seconds_total", "Time spent in each filter stage", ("stage",)
)
FAILING = METRICS.gauge(
    "edgepipe_stage_failing",
    "1 while a stage's last batch failed, labelled with the trap/error code of that failure",
    ("stage", "code"),
)
DEAD = METRICS.counter(
    "edgepipe_dead_letters_total", "messages or batches dead-lettered", ["stage", "reason"]
)
QUARANTINED = METRICS.counter(
    "edgepipe_stage_quarantined_total",
    "Readings an on_error: stop stage failed on limits.stop_attempts times, set aside as "
    "dead letters so the rest of the data flows",
    ("stage",),
)
STATE_DROPPED = METRICS.counter(
    "edgepipe_stage_state_dropped_total",
    "Stage states that could not be saved (snapshot) or given back (restore) and were dropped",
    ("stage", "reason"),
)
RECYCLED = METRICS.counter(
    "edgepipe_stage_recycles_total",
    "Instances replaced between batches because their memory grew past its steady size",
    ("stage",),
)
