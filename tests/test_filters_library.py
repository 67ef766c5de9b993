"""The filter library (filters/lib) on the UCI air-quality data, each module checked
record for record against a Python implementation of the same math."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from core._model import Batch, Flags, SeriesRegistry
from pipeline.chain._chain import Chain
from tests.helpers.wasm import LIB, REPO, airquality, run_chain, stage

SIZES = [1000, 97]


def build(stages, registry, tmp_path: Path) -> Chain:
    return Chain.build(stages, registry, base_dir=REPO, cache_dir=tmp_path / "aot")


def metric(reg: SeriesRegistry, sid: int) -> str:
    return reg.key(sid).metric


def rows(b: Batch) -> list[tuple[int, float, int, int]]:
    return list(b.rows())


@pytest.fixture
def data():
    reg = SeriesRegistry()
    return reg, airquality(reg)


# -- validity ------------------------------------------------------------------------

RANGES = {"CO_GT": [0, 50], "T": [-40, 60], "RH": [0, 100], "AH": [0, 5], "C6H6_GT": [0, 1000]}


def ref_validity(b: Batch, reg: SeriesRegistry, sentinel: float = -200.0) -> Batch:
    out = Batch()
    for ts, v, sid, fl in b.rows():
        lo, hi = RANGES.get(metric(reg, sid), (-math.inf, math.inf))
        if math.isfinite(v) and v != sentinel and lo <= v <= hi:
            out.append(ts, v, sid, fl)
    return out


@pytest.mark.parametrize("size", SIZES)
def test_validity_drops_sentinels_and_impossible_values(data, tmp_path, size):
    reg, batch = data
    # physically impossible values the data set doesn't have, plus non-finite ones
    t = reg.intern("airq-1", "T")
    for v in (-90.0, 75.0, math.nan, math.inf):
        batch.append(1, v, t)
    with build([stage("valid", "validity", "filter", {"range": RANGES})], reg, tmp_path) as ch:
        got = run_chain(ch, batch, size)
    want = ref_validity(batch, reg)
    assert rows(got) == rows(want)
    assert len(got) < len(batch) - 8000  # the -200s are gone
    assert not any(v == -200 for v in got.value)


# -- calibrate -----------------------------------------------------------------------


def test_calibrate_scale_offset_and_units(data, tmp_path):
    reg, batch = data
    cfg = {"scale": {"CO_GT": 1.05}, "offset": {"CO_GT": -0.1, "RH": 2}, "unit": {"T": "c_to_f"}}
    with build([stage("cal", "calibrate", "map", cfg)], reg, tmp_path) as ch:
        got = run_chain(ch, batch, 500)
    want = Batch()
    for ts, v, sid, fl in batch.rows():
        m = metric(reg, sid)
        v = v * {"CO_GT": 1.05}.get(m, 1.0) + {"CO_GT": -0.1, "RH": 2.0}.get(m, 0.0)
        mul, add = (1.8, 32.0) if m == "T" else (1.0, 0.0)
        want.append(ts, v * mul + add, sid, fl | Flags.CALIBRATED)
    assert rows(got) == rows(want)
    t = reg.intern("airq-1", "T")
    first_t = next(i for i, s in enumerate(batch.series) if s == t)
    assert got.value[first_t] == pytest.approx(13.6 * 1.8 + 32)


# -- deadband ------------------------------------------------------------------------


def test_deadband_reports_by_exception(data, tmp_path):
    reg, batch = data
    cfg = {"band": 5, "band.T": 1.0, "max_silence_s": 6 * 3600}
    with build([stage("db", "deadband", "filter", cfg)], reg, tmp_path) as ch:
        got = run_chain(ch, batch, 333)
    state: dict[int, tuple[float, int]] = {}
    want = Batch()
    for ts, v, sid, fl in batch.rows():
        band = 1.0 if metric(reg, sid) == "T" else 5.0
        last = state.get(sid)
        if last is None or abs(v - last[0]) >= band or ts - last[1] >= 6 * 3600 * 1000:
            state[sid] = (v, ts)
            want.append(ts, v, sid, fl)
    assert rows(got) == rows(want)
    assert len(batch) // 10 < len(got) < len(batch) * 0.7


# -- EMA -----------------------------------------------------------------------------


def ref_ema(b: Batch, alpha: float) -> Batch:
    ema: dict[int, float] = {}
    out = Batch()
    for ts, v, sid, fl in b.rows():
        e = ema.get(sid)
        e = v if e is None else e + alpha * (v - e)
        ema[sid] = e
        out.append(ts, e, sid, fl)
    return out


@pytest.mark.parametrize("size", SIZES)
def test_ema_smoothing(data, tmp_path, size):
    reg, batch = data
    with build([stage("ema", "ema", "map", {"alpha": 0.3})], reg, tmp_path) as ch:
        got = run_chain(ch, batch, size)
    assert rows(got) == rows(ref_ema(batch, 0.3))


# -- windowed aggregate ----------------------------------------------------------------


def ref_window(b: Batch, reg: SeriesRegistry, window_ms: int, flush: bool) -> list[tuple]:
    """(ts, value, metric name, flags) of the emitted aggregates."""
    open_: dict[int, list] = {}
    out: list[tuple] = []

    def emit(sid: int, w: list) -> None:
        start, total, lo, hi, n = w
        m = metric(reg, sid)
        out.extend(
            [
                (start, total / n, m + "_mean", Flags.AGGREGATE),
                (start, lo, m + "_min", Flags.AGGREGATE),
                (start, hi, m + "_max", Flags.AGGREGATE),
                (start, float(n), m + "_count", Flags.AGGREGATE),
            ]
        )

    for ts, v, sid, _fl in b.rows():
        start = ts // window_ms * window_ms
        w = open_.get(sid)
        if w is not None:
            if start < w[0]:
                continue
            if start > w[0]:
                emit(sid, w)
                w = None
        if w is None:
            w = open_[sid] = [start, 0.0, v, v, 0]
        w[1] += v
        w[2] = min(w[2], v)
        w[3] = max(w[3], v)
        w[4] += 1
    if flush:
        for sid in sorted(open_):
            emit(sid, open_[sid])
    return out


@pytest.mark.parametrize("size", SIZES)
def test_window_aggregates_by_reading_time(data, tmp_path, size):
    reg, batch = data
    clean = ref_validity(batch, reg)
    cfg = {"window_s": 6 * 3600}
    with build([stage("win", "window", "aggregate", cfg)], reg, tmp_path) as ch:
        got = run_chain(ch, clean, size, flush=True)
    have = [(ts, v, metric(reg, sid), fl) for ts, v, sid, fl in got.rows()]
    want = ref_window(clean, reg, 6 * 3600 * 1000, flush=True)
    # within one batch the guest emits in input order; across the flush in series order
    assert sorted(have) == sorted(want)
    assert len(have) == len(want) > 1000
    assert {m for _, _, m, _ in have} >= {"CO_GT_mean", "T_max", "AH_count"}


def test_window_passthrough_and_stats(data, tmp_path):
    reg, batch = data
    part = batch.take(range(13 * 200))
    cfg = {"window_s": 86400, "stats": ["mean", "max"], "passthrough": True}
    with build([stage("win", "window", "aggregate", cfg)], reg, tmp_path) as ch:
        got = run_chain(ch, part, 1000, flush=True)
    raw = [r for r in got.rows() if not r[3] & Flags.AGGREGATE]
    agg = {metric(reg, sid) for _, _, sid, fl in got.rows() if fl & Flags.AGGREGATE}
    assert raw == list(part.rows())
    assert agg == {f"{m}_{s}" for m in ("CO_GT", "T", "RH", "AH") for s in ("mean", "max")} | {
        f"{metric(reg, s)}_{x}" for s in set(part.series) for x in ("mean", "max")
    }


def test_counters_account_for_every_reading(data, tmp_path):
    """Every reading out of a chain is explained by the counters: out = in - dropped +
    emitted, with filtering, non-passthrough aggregation and passthrough aggregation."""
    from core._metrics import METRICS

    reg, batch = data
    part = batch.take(range(13 * 300))
    stages = [
        stage("acc_valid", "validity", "filter", {"range": RANGES}),
        stage("acc_pass", "window", "aggregate", {"window_s": 3600 * 6, "passthrough": True}),
        stage("acc_agg", "window", "aggregate", {"window_s": 86400, "stats": ["mean"]}),
    ]

    def counted(name: str) -> float:
        return sum(METRICS.value(name, stage=s.name) for s in stages)

    before = (
        counted("edgepipe_readings_dropped_total"),
        counted("edgepipe_readings_emitted_total"),
    )
    with build(stages, reg, tmp_path) as ch:
        got = run_chain(ch, part, 500, flush=True)
    dropped = counted("edgepipe_readings_dropped_total") - before[0]
    emitted = counted("edgepipe_readings_emitted_total") - before[1]
    assert dropped > 0 and emitted > 0
    assert len(got) == len(part) - dropped + emitted


# -- spike -----------------------------------------------------------------------------


def test_spike_flags_rate_of_change(data, tmp_path):
    reg, batch = data
    clean = ref_validity(batch, reg)
    cfg = {"max_rate": 0.5, "max_rate.T": 2 / 3600}  # per second: T may move 2 degrees/h
    with build([stage("sp", "spike", "map", cfg)], reg, tmp_path) as ch:
        got = run_chain(ch, clean, 250)
    prev: dict[int, tuple[float, int]] = {}
    want = Batch()
    for ts, v, sid, fl in clean.rows():
        p = prev.get(sid)
        rate = 2 / 3600 if metric(reg, sid) == "T" else 0.5
        if p is not None and ts > p[1] and abs(v - p[0]) / ((ts - p[1]) / 1000.0) > rate:
            fl |= Flags.SPIKE
        prev[sid] = (v, ts)
        want.append(ts, v, sid, fl)
    assert rows(got) == rows(want)
    flagged = sum(1 for f in got.flags if f & Flags.SPIKE)
    assert 0 < flagged < len(got)


# -- z-score ---------------------------------------------------------------------------


def ref_zscore(b: Batch, alpha: float, threshold: float, warmup: int) -> Batch:
    st: dict[int, list] = {}
    out = Batch()
    for ts, x, sid, fl in b.rows():
        s = st.get(sid)
        if s is None:
            st[sid] = [x, 0.0, 1]
            out.append(ts, x, sid, fl)
            continue
        mean, var, n = s
        diff = x - mean
        if n >= warmup and var > 0.0 and abs(diff) / math.sqrt(var) > threshold:
            fl |= Flags.ANOMALY
        incr = alpha * diff
        s[0] = mean + incr
        s[1] = (1.0 - alpha) * (var + diff * incr)
        s[2] = n + 1
        out.append(ts, x, sid, fl)
    return out


@pytest.mark.parametrize("size", SIZES)
def test_zscore_flags_anomalies(data, tmp_path, size):
    reg, batch = data
    clean = ref_validity(batch, reg)
    cfg = {"alpha": 0.05, "threshold": 3, "warmup": 24}
    with build([stage("z", "zscore", "map", cfg)], reg, tmp_path) as ch:
        got = run_chain(ch, clean, size)
    assert rows(got) == rows(ref_zscore(clean, 0.05, 3.0, 24))
    assert 0 < sum(1 for f in got.flags if f & Flags.ANOMALY) < len(got) // 10


# -- dedup (Zig) -----------------------------------------------------------------------


def test_dedup_drops_repeated_series_and_ts(data, tmp_path):
    reg, batch = data
    part = batch.take(range(13 * 500))
    # every 7th record delivered again, a few positions later (QoS 1 redelivery)
    noisy = Batch()
    pending = []
    for i, r in enumerate(part.rows()):
        noisy.append(*r)
        if i % 7 == 0:
            pending.append(r)
        if i % 7 == 3:
            for p in pending:
                noisy.append(*p)
            pending.clear()
    with build([stage("dd", "dedup", "filter")], reg, tmp_path) as ch:
        got = run_chain(ch, noisy, 101)
    assert rows(got) == rows(part)
    assert len(noisy) > len(part)


# -- a whole chain ------------------------------------------------------------------


def test_full_chain_matches_python_pipeline(data, tmp_path):
    reg, batch = data
    stages = [
        stage("valid", "validity", "filter", {"range": RANGES}),
        stage("dedup", "dedup", "filter"),
        stage("ema", "ema", "map", {"alpha": 0.3}),
        stage("z", "zscore", "map", {"alpha": 0.05, "threshold": 3, "warmup": 24}),
    ]
    with build(stages, reg, tmp_path) as ch:
        got = run_chain(ch, batch, 640)
    want = ref_zscore(ref_ema(ref_validity(batch, reg), 0.3), 0.05, 3.0, 24)
    assert rows(got) == rows(want)


def test_match_limits_a_stage_to_some_metrics(data, tmp_path):
    reg, batch = data
    part = batch.take(range(13 * 50))
    st = stage("ema", "ema", "map", {"alpha": 0.5}, match={"metrics": ["T", "RH"]})
    with build([st], reg, tmp_path) as ch:
        got = run_chain(ch, part, 13 * 50)
    sel = [i for i, s in enumerate(part.series) if metric(reg, s) in ("T", "RH")]
    rest = [i for i in range(len(part)) if i not in set(sel)]
    want = ref_ema(part.take(sel), 0.5)
    want.extend(part.take(rest))
    assert rows(got) == rows(want)


# -- the build ---------------------------------------------------------------------------


def test_committed_modules_rebuild_byte_identical():
    proc = subprocess.run(
        [sys.executable, str(REPO / "filters" / "build.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.stem for p in LIB.glob("*.wasm")) == sorted(
        p.stem for p in LIB.iterdir() if p.suffix in (".c", ".zig", ".rs")
    )
