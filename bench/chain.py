"""Filter chain cost: Wasm stages vs the same filters in pure Python, and cold start.

    python -m bench.chain [--records N] [--rounds N] [--json bench/results/chain.json]
                          [--only-filters | --memory | --callgrind] [--against TREE [--runs N]]

First, per library filter at batch sizes 10, 100 and 1000: CPU ns per record through
edgepipe (one stage in a :class:`Chain`) next to the same filter in idiomatic Python on
the same batches, interleaved round by round (median of the rounds), plus the host
overhead alone (an identity ``map`` stage) and the example's 3-stage chain
(pipeline.yaml: validity, calibrate on CO_GT, 10-minute window).  Then the per-record
cost of 1, 3 and 5 chained stages at batch sizes 1, 10, 100 and 1000 on the UCI
air-quality data (13 metrics per hourly row, file order), next to a pure-Python
implementation of the same math; then the cold start of one stage from the AOT cache
vs compiling the module from its bytes.  Each Python baseline is first checked to give the
same records as edgepipe on the same batches.

``--memory`` instead measures the example chain alone in fresh processes (AOT cache warm):
RSS after building it and after 100 batches of 1000 (and of 6500: 500 messages of 13
readings), and the peak (VmHWM), and how long the build and the first batch take, medians
of 5 processes.

``--callgrind`` counts instructions per record under ``valgrind --tool=callgrind`` -- of
the example chain at batch 1000, and of the identity stage (the host's overhead per stage)
at batch 1000 and 100 -- as the difference between two runs 30,000 records apart (so
start-up cancels out): figures that do not drift with the machine's load.

``--against TREE`` (with ``--only-filters``, ``--memory`` or ``--callgrind``) runs the same harness on
another edgepipe tree too -- ``git worktree add --detach /tmp/edgepipe-main main`` -- in
child processes alternating with this tree's, so "before" and "after" share one run of
the machine: ``python -m bench.chain --only-filters --against /tmp/edgepipe-main``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from config._models import StageConfig
from core._model import Batch, Flags, SeriesRegistry
from devtools import _dataset as dataset
from pipeline.chain._chain import Chain

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "filters" / "lib"

RANGES = {"CO_GT": [0, 50], "T": [-40, 60], "RH": [0, 100], "AH": [0, 5]}
HIGH = {"CO_GT": 4.0, "T": 30.0, "NO2_GT": 150.0}
LOW = {"T": 5.0, "RH": 15.0}
HYST = {"T": 1.0, "CO_GT": 0.5}
STAGES = {
    "validity": ("filter", {"range": RANGES}),
    "calibrate": ("map", {"unit": {"T": "c_to_f"}, "scale": {"CO_GT": 1.05}}),
    "ema": ("map", {"alpha": 0.3}),
    "spike": ("map", {"max_rate": 0.5}),
    "zscore": ("map", {"alpha": 0.05, "threshold": 3, "warmup": 24}),
}
#: library filters measured only in the per-filter table
EXTRA = {
    "deadband": ("filter", {"band": 5, "band.T": 1.0, "max_silence_s": 6 * 3600}),
    "dedup": ("filter", {}),
    "threshold": ("map", {"high": HIGH, "low": LOW, "hysteresis": HYST}),
}
CHAINS = {1: ["validity"], 3: ["validity", "ema", "zscore"], 5: list(STAGES)}
SIZES = [1, 10, 100, 1000]


def read_airquality(path: Path, registry: SeriesRegistry, device: str = "airq-1") -> Batch:
    """The UCI air-quality CSV (Date,Time + 13 metrics, -200 = missing) as one batch,
    row by row, metrics in column order; timestamps as UTC."""
    sids = [registry.intern(device, m) for m in dataset.METRICS]
    out = Batch()
    for ts, values in dataset.read_rows(path):
        for sid, v in zip(sids, values, strict=True):
            out.append(ts, v, sid)
    return out


def load_data(registry: SeriesRegistry) -> Batch:
    return read_airquality(dataset.FULL, registry)


# -- the same filters in pure Python (batch in, batch out) -----------------------------


class PyBatch:
    """A batch as idiomatic Python holds one: four lists (what the Python filters get)."""

    __slots__ = ("ts", "value", "series", "flags")

    def __init__(self, b: Batch | None = None) -> None:
        if b is None:
            self.ts, self.value, self.series, self.flags = [], [], [], []
        else:
            self.ts, self.value, self.series, self.flags = b.ts, b.value, b.series, b.flags

    def __len__(self) -> int:
        return len(self.ts)

    def append(self, ts: int, value: float, series: int, flags: int = 0) -> None:
        self.ts.append(ts)
        self.value.append(value)
        self.series.append(series)
        self.flags.append(flags)

    def rows(self):
        return zip(self.ts, self.value, self.series, self.flags, strict=True)


class PyStages:
    def __init__(self, registry: SeriesRegistry, ranges: dict | None = None) -> None:
        self.reg = registry
        self.valid_ranges = RANGES if ranges is None else ranges
        self.metric = lambda sid: registry.key(sid).metric
        self.ranges: dict[int, tuple[float, float]] = {}
        self.cal: dict[int, tuple[float, float, float, float]] = {}
        self.ema: dict[int, float] = {}
        self.prev: dict[int, tuple[float, int]] = {}
        self.z: dict[int, list] = {}
        self.win: dict[int, list] = {}
        self.derived: dict[int, list[int]] = {}
        self.band: dict[int, float] = {}
        self.reported: dict[int, tuple[float, int]] = {}
        self.seen: dict[int, list[int]] = {}
        self.limits: dict[int, tuple[float, float, float]] = {}
        self.alarm: dict[int, bool] = {}

    def validity(self, b: PyBatch) -> PyBatch:
        out = PyBatch()
        rng = self.ranges
        for ts, v, sid, fl in b.rows():
            r = rng.get(sid)
            if r is None:
                lo, hi = self.valid_ranges.get(self.metric(sid), (-math.inf, math.inf))
                r = rng[sid] = (lo, hi)
            if math.isfinite(v) and v != -200.0 and r[0] <= v <= r[1]:
                out.append(ts, v, sid, fl)
        return out

    def calibrate(self, b: PyBatch) -> PyBatch:
        out = PyBatch()
        for ts, v, sid, fl in b.rows():
            c = self.cal.get(sid)
            if c is None:
                m = self.metric(sid)
                scale = 1.05 if m == "CO_GT" else 1.0
                mul, add = (1.8, 32.0) if m == "T" else (1.0, 0.0)
                c = self.cal[sid] = (scale, 0.0, mul, add)
            v = v * c[0] + c[1]
            out.append(ts, v * c[2] + c[3], sid, fl | Flags.CALIBRATED)
        return out

    def ema_(self, b: PyBatch) -> PyBatch:
        out = PyBatch()
        ema = self.ema
        for ts, v, sid, fl in b.rows():
            e = ema.get(sid)
            e = v if e is None else e + 0.3 * (v - e)
            ema[sid] = e
            out.append(ts, e, sid, fl)
        return out

    def spike(self, b: PyBatch) -> PyBatch:
        out = PyBatch()
        prev = self.prev
        for ts, v, sid, fl in b.rows():
            p = prev.get(sid)
            if p is not None and ts > p[1] and abs(v - p[0]) / ((ts - p[1]) / 1000.0) > 0.5:
                fl |= Flags.SPIKE
            prev[sid] = (v, ts)
            out.append(ts, v, sid, fl)
        return out

    def zscore(self, b: PyBatch) -> PyBatch:
        out = PyBatch()
        st = self.z
        for ts, x, sid, fl in b.rows():
            s = st.get(sid)
            if s is None:
                st[sid] = [x, 0.0, 1]
            else:
                mean, var, n = s
                diff = x - mean
                if n >= 24 and var > 0.0 and abs(diff) / math.sqrt(var) > 3.0:
                    fl |= Flags.ANOMALY
                incr = 0.05 * diff
                s[0] = mean + incr
                s[1] = 0.95 * (var + diff * incr)
                s[2] = n + 1
            out.append(ts, x, sid, fl)
        return out

    def chain(self, names: list[str]):
        fns = [getattr(self, "ema_" if n == "ema" else n) for n in names]

        def run(b: Batch) -> Batch:
            for f in fns:
                b = f(b)
            return b

        return run

    def window(self, b: PyBatch) -> PyBatch:
        """10-minute tumbling mean/min/max/count per series, raw readings passed on."""
        out = PyBatch()
        st = self.win
        derived = self.derived
        for ts, v, sid, fl in b.rows():
            out.append(ts, v, sid, fl)
            start = ts - ts % 600_000
            w = st.get(sid)
            if w is not None and start > w[0]:
                ids = derived.get(sid)
                if ids is None:
                    ids = derived[sid] = [
                        self.reg.derive(sid, x) for x in ("_mean", "_min", "_max", "_count")
                    ]
                ws, total, lo, hi, n = w
                for i, x in zip(ids, (total / n, lo, hi, float(n)), strict=True):
                    out.append(ws, x, i, Flags.AGGREGATE)
                w = None
            if w is None:
                st[sid] = [start, v, v, v, 1]
            elif start == w[0]:
                w[1] += v
                w[2] = min(w[2], v)
                w[3] = max(w[3], v)
                w[4] += 1
        return out

    def identity(self, b: PyBatch) -> PyBatch:
        return b

    def deadband(self, b: PyBatch) -> PyBatch:
        """Report by exception: a change of at least the band, or 6 h of silence."""
        out = PyBatch()
        bands, last = self.band, self.reported
        for ts, v, sid, fl in b.rows():
            band = bands.get(sid)
            if band is None:
                band = bands[sid] = 1.0 if self.metric(sid) == "T" else 5.0
            p = last.get(sid)
            if p is None or abs(v - p[0]) >= band or ts - p[1] >= 6 * 3600 * 1000:
                last[sid] = (v, ts)
                out.append(ts, v, sid, fl)
        return out

    def dedup(self, b: PyBatch) -> PyBatch:
        """Drop a (series, ts) seen among the series' last 8 timestamps."""
        out = PyBatch()
        seen = self.seen
        for ts, v, sid, fl in b.rows():
            recent = seen.get(sid)
            if recent is None:
                recent = seen[sid] = []
            elif ts in recent:
                continue
            recent.append(ts)
            if len(recent) > 8:
                del recent[0]
            out.append(ts, v, sid, fl)
        return out

    def threshold(self, b: PyBatch) -> PyBatch:
        """The ANOMALY flag while a series is in alarm, with hysteresis."""
        out = PyBatch()
        limits, alarm = self.limits, self.alarm
        for ts, v, sid, fl in b.rows():
            lim = limits.get(sid)
            if lim is None:
                m = self.metric(sid)
                lim = limits[sid] = (
                    LOW.get(m, -math.inf),
                    HIGH.get(m, math.inf),
                    HYST.get(m, 0.0),
                )
            on = alarm.get(sid, False)
            if v == v:
                if not on:
                    on = v > lim[1] or v < lim[0]
                elif lim[0] + lim[2] <= v <= lim[1] - lim[2]:
                    on = False
                alarm[sid] = on
            out.append(ts, v, sid, fl | Flags.ANOMALY if on else fl)
        return out


def stage_cfgs(names: list[str]) -> list[StageConfig]:
    known = STAGES | EXTRA
    return [
        StageConfig(name=n, module=LIB / f"{n}.wasm", kind=known[n][0], config=known[n][1])
        for n in names
    ]


#: A map stage that returns its input unchanged: what the host costs on its own.
IDENTITY_WAT = """
(module
  (memory (export "memory") 1)
  (global $cap (mut i32) (i32.const 0))
  (func (export "ep_abi_version") (result i32) (i32.const 1))
  (func (export "ep_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "ep_input") (param $n i32) (result i32)
    (local $need i32)
    (local.set $need (i32.add (i32.const 1024) (i32.mul (local.get $n) (i32.const 24))))
    (if (i32.gt_u (local.get $need) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow
        (i32.sub (i32.div_u (i32.add (local.get $need) (i32.const 65535)) (i32.const 65536))
                 (memory.size))))))
    (i32.const 1024))
  (func (export "ep_process") (param $n i32) (result i64)
    (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.extend_i32_u (local.get $n))))
)
"""

#: The example pipeline.yaml's chain.
EXAMPLE = [
    (
        "validity",
        "filter",
        {"sentinel": -200, "range": {"T": [-40, 60], "RH": [0, 100], "AH": [0, 5]}},
        None,
    ),
    ("calibrate", "map", {"scale.CO_GT": 1.02, "offset.CO_GT": -0.05}, ["CO_GT"]),
    ("window", "aggregate", {"window_s": 600, "passthrough": True}, None),
]


def example_cfgs() -> list[StageConfig]:
    return [
        StageConfig(
            name=n,
            module=LIB / f"{n}.wasm",
            kind=kind,
            config=cfg,
            **({"match": {"metrics": m}} if m else {}),
        )
        for n, kind, cfg, m in EXAMPLE
    ]


class PyExample:
    """The example chain in Python (validity, calibrate on CO_GT, window)."""

    def __init__(self, reg: SeriesRegistry) -> None:
        self.p = PyStages(reg, EXAMPLE[0][2]["range"])
        self.reg = reg
        self.co: dict[int, bool] = {}

    def __call__(self, b: PyBatch) -> PyBatch:
        b = self.p.validity(b)
        # the stage sees the CO_GT readings; its output goes on first, then the others
        out, rest = PyBatch(), PyBatch()
        co = self.co
        for ts, v, sid, fl in b.rows():
            hit = co.get(sid)
            if hit is None:
                hit = co[sid] = self.reg.key(sid).metric == "CO_GT"
            if hit:
                out.append(ts, v * 1.02 - 0.05, sid, fl | Flags.CALIBRATED)
            else:
                rest.append(ts, v, sid, fl)
        for col in PyBatch.__slots__:
            getattr(out, col).extend(getattr(rest, col))
        return self.p.window(out)


FILTERS = [
    "identity",
    "validity",
    "deadband",
    "dedup",
    "calibrate",
    "ema",
    "spike",
    "zscore",
    "threshold",
    "window",
    "example",
]
FILTER_SIZES = [10, 100, 1000]


def _filter_cfgs(name: str, tmp: Path) -> list[StageConfig]:
    reg_cfgs: list[StageConfig]
    if name == "identity":
        import wasmtime

        path = tmp / "identity.wasm"
        path.write_bytes(wasmtime.wat2wasm(IDENTITY_WAT))
        reg_cfgs = [StageConfig(name="identity", module=path, kind="map")]
    elif name == "example":
        reg_cfgs = example_cfgs()
    elif name == "window":
        reg_cfgs = [
            StageConfig(
                name="window",
                module=LIB / "window.wasm",
                kind="aggregate",
                config={"window_s": 600, "passthrough": True},
            )
        ]
    else:
        reg_cfgs = stage_cfgs([name])
    return reg_cfgs


def filters_side_by_side(
    data: Batch, reg: SeriesRegistry, tmp: Path, records: int, rounds: int
) -> list[dict]:
    """Each library filter through edgepipe and in Python, round by round, medians."""
    rows = []
    print(
        f"{'filter':>10} {'batch':>6} {'edgepipe':>10} {'python':>10} {'ratio':>7}"
        "   (CPU ns per record, median of rounds)"
    )
    for name in FILTERS:
        for size in FILTER_SIZES:
            parts = split(data, size, records)
            py_parts = [PyBatch(p) for p in parts]
            cfgs = _filter_cfgs(name, tmp)
            _same_output(name, cfgs, reg, tmp, parts, py_parts)
            wasm, py = [], []
            with Chain.build(cfgs, reg, base_dir=REPO, cache_dir=tmp) as ch:
                measure(ch.process, parts[: max(1, len(parts) // 10)])  # warm up
                for _ in range(rounds):
                    wasm.append(measure(ch.process, parts)[1])
                    py.append(measure(_python(name, reg), py_parts)[1])
            w, p = statistics.median(wasm), statistics.median(py)
            rows.append(
                {
                    "filter": name,
                    "batch": size,
                    "edgepipe_cpu_ns_per_record": round(w, 1),
                    "python_cpu_ns_per_record": round(p, 1),
                    "python_over_edgepipe": round(p / w, 2),
                    "rounds": rounds,
                }
            )
            print(f"{name:>10} {size:>6} {w:>10.0f} {p:>10.0f} {p / w:>6.1f}x", flush=True)
    return rows


def _python(name: str, reg: SeriesRegistry):
    if name == "example":
        return PyExample(reg)
    return getattr(PyStages(reg), "ema_" if name == "ema" else name)


def _same_output(
    name: str,
    cfgs: list[StageConfig],
    reg: SeriesRegistry,
    tmp: Path,
    parts: list[Batch],
    py_parts: list[PyBatch],
) -> None:
    """The Python baseline is the same filter: from fresh state, both give the same
    records on these batches (else the comparison would mean nothing)."""
    fn = _python(name, reg)
    want = [r for p in py_parts for r in fn(p).rows()]
    with Chain.build(cfgs, reg, base_dir=REPO, cache_dir=tmp) as ch:
        got = [r for p in parts for r in ch.process(p).batch.rows()]
    if got != want:
        diff = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
        raise SystemExit(
            f"{name}: edgepipe and the Python baseline differ ({len(got)} / {len(want)} "
            f"records; first at {diff}: {got[diff]} / {want[diff]})"
        )


def split(batch: Batch, size: int, limit: int) -> list[Batch]:
    n = min(len(batch), limit)
    return [batch.take(range(i, min(i + size, n))) for i in range(0, n, size)]


def measure(fn, parts: list[Batch]) -> tuple[float, float, int]:
    """(wall ns/record, CPU ns/record of this thread, records)."""
    records = sum(len(p) for p in parts)
    t, c = time.perf_counter(), time.thread_time()
    for p in parts:
        fn(p)
    wall, cpu = time.perf_counter() - t, time.thread_time() - c
    return wall / records * 1e9, cpu / records * 1e9, records


def cold_start(cache_dir: Path, reg: SeriesRegistry, repeat: int = 7) -> dict[str, float]:
    from pipeline.chain._stage import WasmStage

    cfg = stage_cfgs(["zscore"])[0]
    res = {}
    for label, cdir in (("compile_ms", None), ("aot_cache_ms", cache_dir)):
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            st = WasmStage(cfg, reg, base_dir=REPO, cache=_cache(cdir))
            times.append((time.perf_counter() - t) * 1000)
            st.close()
        res[label] = statistics.median(times)
    t = time.perf_counter()
    with Chain.build(stage_cfgs(CHAINS[5]), reg, base_dir=REPO, cache_dir=None):
        pass
    res["chain5_compile_ms"] = (time.perf_counter() - t) * 1000
    with Chain.build(stage_cfgs(CHAINS[5]), reg, base_dir=REPO, cache_dir=cache_dir):
        pass  # fills the cache
    t = time.perf_counter()
    with Chain.build(stage_cfgs(CHAINS[5]), reg, base_dir=REPO, cache_dir=cache_dir):
        pass
    res["chain5_from_cache_ms"] = (time.perf_counter() - t) * 1000
    return res


def _cache(cdir: Path | None):
    from pipeline.chain._engine import engine, engine_settings
    from pipeline.wasm._aot import ModuleCache

    return ModuleCache(cdir, engine(), engine_settings())


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, kB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def memory_child(size: int, batches: int, cache: str) -> None:
    """In a fresh process: the example chain from a warm AOT cache, ``batches`` batches
    of ``size`` records; prints the RSS before the build, after it and after the run, and
    how long the build and the first batch took."""
    import gc

    reg = SeriesRegistry()
    data = load_data(reg)
    parts = split(data, size, size * batches)
    gc.collect()
    before = _status()
    t = time.perf_counter()
    with Chain.build(example_cfgs(), reg, base_dir=REPO, cache_dir=Path(cache)) as ch:
        build_ms = (time.perf_counter() - t) * 1000
        built = _status()
        t = time.perf_counter()
        ch.process(parts[0])
        first_ms = (time.perf_counter() - t) * 1000
        for p in parts[1:]:
            ch.process(p)
        ran = _status()
    print(
        json.dumps(
            {
                "before": before,
                "built": built,
                "ran": ran,
                "batches": len(parts),
                "build_ms": build_ms,
                "first_batch_ms": first_ms,
            }
        )
    )


class Tree(NamedTuple):
    """Where a child process runs this harness: ``label``, its cwd and environment."""

    label: str
    cwd: Path
    env: dict[str, str]


def trees(against: Path | None, tmp: Path) -> list[Tree]:
    """This tree ("after") and, with ``against`` (another edgepipe tree, e.g. a ``git
    worktree`` of main), that one first ("before"): the same harness -- a copy of this
    file next to that tree's filters/ -- importing everything else from it."""
    ours = Tree("after", REPO, os.environ | {"PYTHONPATH": str(REPO)})
    if against is None:
        return [ours]
    d = tmp / "harness"
    (d / "bench").mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, d / "bench" / "chain.py")
    (d / "bench" / "__init__.py").write_text("")
    (d / "filters").symlink_to(against.resolve() / "filters")
    env = os.environ | {"PYTHONPATH": f"{d}{os.pathsep}{against.resolve()}"}
    return [Tree("before", d, env), ours]


def _child(tree: Tree, args: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=tree.cwd, env=tree.env, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"{tree.label}: {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def memory(sizes: list[int], batches: int, repeats: int, where: list[Tree]) -> list[dict]:
    """RSS of the example chain alone, each figure the median of ``repeats`` processes
    (the trees alternating process by process)."""
    cache = Path(tempfile.mkdtemp(prefix="edgepipe-bench-aot-"))
    code = (
        "import sys; from bench.chain import memory_child as m; "
        "m(*map(int, sys.argv[1:3]), sys.argv[3])"
    )
    rows = []
    try:
        for t in where:  # fills each tree's AOT cache
            _child(t, ["-c", code, "10", "1", str(cache / t.label)])
        print(
            f"{'tree':>6} {'batch':>6} {'batches':>7} {'built MB':>9} {'after MB':>9} "
            f"{'peak MB':>8} {'run growth MB':>14} {'build ms':>9} {'1st batch ms':>13}"
            f"   (example chain alone, AOT cache warm, median of {repeats})"
        )
        for size in sizes:
            runs: dict[str, list[dict]] = {t.label: [] for t in where}
            for _ in range(repeats):
                for t in where:
                    out = _child(t, ["-c", code, str(size), str(batches), str(cache / t.label)])
                    runs[t.label].append(json.loads(out))
            for label, got in runs.items():
                med = {
                    k: statistics.median(r[at][key] for r in got) / 1024
                    for k, at, key in (
                        ("built_mb", "built", "VmRSS"),
                        ("after_mb", "ran", "VmRSS"),
                        ("peak_mb", "ran", "VmHWM"),
                    )
                }
                med["growth_mb"] = med["after_mb"] - med["built_mb"]
                med["build_ms"] = statistics.median(r["build_ms"] for r in got)
                med["first_batch_ms"] = statistics.median(r["first_batch_ms"] for r in got)
                done = got[0]["batches"]
                rows.append(
                    {
                        "tree": label,
                        "batch": size,
                        "batches": done,
                        **{k: round(v, 2) for k, v in med.items()},
                    }
                )
                print(
                    f"{label:>6} {size:>6} {done:>7} {med['built_mb']:>9.1f} "
                    f"{med['after_mb']:>9.1f} {med['peak_mb']:>8.1f} {med['growth_mb']:>14.1f} "
                    f"{med['build_ms']:>9.1f} {med['first_batch_ms']:>13.1f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def callgrind_child(workload: str, size: int, batches: int, cache: str) -> None:
    """In a fresh process: ``workload`` (the example chain, or the identity stage: the
    host's overhead alone) from a warm AOT cache over ``batches`` batches of ``size``
    records (what :func:`instructions` counts under callgrind)."""
    reg = SeriesRegistry()
    data = load_data(reg)
    parts = split(data, size, size * max(1, batches))[:batches]
    cfgs = _filter_cfgs(workload, Path(cache))
    with Chain.build(cfgs, reg, base_dir=REPO, cache_dir=Path(cache)) as ch:
        for p in parts:
            ch.process(p)


#: what is counted: (workload, batch size, the two batch counts whose difference is
#: counted, so start-up cancels out: 30,000 records between them)
CALLGRIND_WORKLOADS = (
    ("example", 1000, (10, 40)),
    ("identity", 1000, (10, 40)),
    ("identity", 100, (100, 400)),
)


def instructions(where: list[Tree], tmp: Path) -> list[dict]:
    """Instructions per record of the example chain at batch 1000, and of the identity
    stage (the host's overhead per stage) at batch 1000 and 100, counted by ``valgrind
    --tool=callgrind``: the difference between two runs of 30,000 records apart -- the
    same number on a busy machine as on a quiet one (with one compilation thread and a
    fixed hash seed, two runs differ by about 10,000 instructions of 2 billion)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    code = (
        "import sys; from bench.chain import callgrind_child as m; "
        "m(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])"
    )
    rows = []
    print(
        f"{'tree':>6} {'workload':>10} {'batch':>6} {'instructions per record':>24}   (callgrind)"
    )
    for t in where:
        cache = tmp / f"cg-{t.label}"
        cache.mkdir(parents=True, exist_ok=True)
        env = t.env | {"RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

        def counted(
            workload: str, size: int, n: int, t: Tree = t, cache: Path = cache, env: dict = env
        ) -> int:
            out = tmp / f"cg-{t.label}-{workload}-{size}-{n}.out"
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            args = [workload, str(size), str(n), str(cache)]
            proc = subprocess.run(
                [*cmd, sys.executable, "-c", code, *args],
                cwd=t.cwd,
                env=env,
                capture_output=True,
                text=True,
            )
            found = [ln for ln in proc.stderr.splitlines() if "Collected :" in ln]
            if proc.returncode or not found:
                raise SystemExit(f"{t.label}: callgrind failed:\n{proc.stderr[-2000:]}")
            return int(found[-1].split(":")[-1])

        for workload, size, batches in CALLGRIND_WORKLOADS:
            # fills the AOT cache under valgrind: its emulated CPU has other features than
            # the host's, so machine code compiled outside it is refused (and compiled again)
            counted(workload, size, 1)
            counts = [counted(workload, size, n) for n in batches]
            per = (counts[1] - counts[0]) / ((batches[1] - batches[0]) * size)
            rows.append(
                {
                    "tree": t.label,
                    "workload": workload,
                    "batch": size,
                    "instructions_per_record": round(per),
                    "counts": counts,
                }
            )
            print(f"{t.label:>6} {workload:>10} {size:>6} {per:>24,.0f}", flush=True)
    return rows


def filters_against(where: list[Tree], runs: int, rounds: int, records: int, tmp: Path):
    """The per-filter table in child processes, the trees alternating run by run; each
    figure the median over the runs of each run's median of ``rounds``."""
    got: dict[str, list[list[dict]]] = {t.label: [] for t in where}
    for i in range(runs):
        for t in where:
            out = tmp / f"{t.label}-{i}.json"
            args = ["-m", "bench.chain", "--only-filters", "--rounds", str(rounds)]
            _child(t, [*args, "--records", str(records), "--json", str(out)])
            got[t.label].append(json.loads(out.read_text())["filters"])
            print(f"run {i + 1} of {runs}: {t.label} done", flush=True)

    def med(label: str, key: str) -> dict[tuple[str, int], float]:
        vals: dict[tuple[str, int], list[float]] = {}
        for run in got[label]:
            for r in run:
                vals.setdefault((r["filter"], r["batch"]), []).append(r[key])
        return {k: statistics.median(v) for k, v in vals.items()}

    after, py = med("after", "edgepipe_cpu_ns_per_record"), med("after", "python_cpu_ns_per_record")
    before = med("before", "edgepipe_cpu_ns_per_record") if "before" in got else {}
    rows = []
    print(
        f"{'filter':>10} {'batch':>6} {'before':>8} {'after':>8} {'python':>8} {'py/after':>9}"
        f"   (CPU ns per record; medians over {runs} runs of {rounds} rounds)"
    )
    for (name, size), a in after.items():
        b = before.get((name, size))
        p = py[(name, size)]
        rows.append(
            {
                "filter": name,
                "batch": size,
                "before_ns_per_record": None if b is None else round(b, 1),
                "after_ns_per_record": round(a, 1),
                "python_ns_per_record": round(p, 1),
                "python_over_after": round(p / a, 2),
                "runs": runs,
                "rounds": rounds,
            }
        )
        shown = "" if b is None else f"{b:.0f}"
        print(f"{name:>10} {size:>6} {shown:>8} {a:>8.0f} {p:>8.0f} {p / a:>8.1f}x")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=30_000, help="records per measurement")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "chain.json")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the per-filter table")
    ap.add_argument("--only-filters", action="store_true", help="only the per-filter table")
    ap.add_argument(
        "--memory",
        action="store_true",
        help="only the RSS of the example chain alone (fresh processes, batch 1000 and 6500)",
    )
    ap.add_argument(
        "--callgrind",
        action="store_true",
        help="only instructions per record under valgrind's callgrind (the example chain, "
        "the identity stage)",
    )
    ap.add_argument(
        "--against",
        type=Path,
        metavar="TREE",
        help="with --only-filters, --memory or --callgrind: also run this harness on another "
        "edgepipe tree (e.g. a git worktree of main), alternating with this one",
    )
    ap.add_argument("--runs", type=int, default=3, help="with --against: runs of each tree")
    args = ap.parse_args(argv)
    if args.memory or args.callgrind or (args.against and args.only_filters):
        tmp = Path(tempfile.mkdtemp(prefix="edgepipe-bench-"))
        try:
            where = trees(args.against, tmp)
            if args.memory:
                result = {"memory": memory([1000, 6500], 100, 5, where)}
            elif args.callgrind:
                result = {"instructions": instructions(where, tmp)}
            else:
                result = {
                    "against": str(args.against),
                    "filters": filters_against(where, args.runs, args.rounds, args.records, tmp),
                }
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
        return 0
    if args.against:
        ap.error("--against goes with --only-filters, --memory or --callgrind")

    reg = SeriesRegistry()
    data = load_data(reg)
    tmp = Path(tempfile.mkdtemp(prefix="edgepipe-bench-"))
    rows = []
    try:
        filters = filters_side_by_side(data, reg, tmp, args.records, args.rounds)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.only_filters:
        shutil.rmtree(tmp, ignore_errors=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"filters": filters}, indent=2) + "\n")
        print(f"wrote {args.json}")
        return 0
    print(
        f"{'stages':>6} {'batch':>6} {'wasm cpu':>12} {'python cpu':>12} {'wasm wall':>12} "
        f"{'python wall':>12} {'wasm us/bat':>12}\n{'':>14}(ns per record; CPU = this thread)"
    )
    try:
        for n_stages, names in CHAINS.items():
            for size in SIZES:
                limit = args.records if size >= 100 else args.records // (3 if size == 1 else 2)
                parts = split(data, size, limit)
                with Chain.build(stage_cfgs(names), reg, base_dir=REPO, cache_dir=tmp) as ch:
                    measure(ch.process, parts[: max(1, len(parts) // 20)])  # warm up
                    wasm_wall, wasm_cpu, records = measure(ch.process, parts)
                py = PyStages(reg).chain(names)
                py_wall, py_cpu, _ = measure(py, [PyBatch(p) for p in parts])
                rows.append(
                    {
                        "stages": n_stages,
                        "batch": size,
                        "records": records,
                        "wasm_cpu_ns_per_record": round(wasm_cpu, 1),
                        "python_cpu_ns_per_record": round(py_cpu, 1),
                        "wasm_wall_ns_per_record": round(wasm_wall, 1),
                        "python_wall_ns_per_record": round(py_wall, 1),
                        "wasm_cpu_us_per_batch": round(wasm_cpu * size / 1000, 2),
                    }
                )
                print(
                    f"{n_stages:>6} {size:>6} {wasm_cpu:>12.0f} {py_cpu:>12.0f} "
                    f"{wasm_wall:>12.0f} {py_wall:>12.0f} {wasm_cpu * size / 1000:>12.1f}",
                    flush=True,
                )
        cold = cold_start(tmp / "cold", reg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"cold start of one stage (zscore): compile {cold['compile_ms']:.2f} ms, "
        f"from AOT cache {cold['aot_cache_ms']:.2f} ms; 5-stage chain: compile "
        f"{cold['chain5_compile_ms']:.1f} ms, from cache {cold['chain5_from_cache_ms']:.1f} ms"
    )
    result = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "data_records": len(data),
        "chains": {str(k): v for k, v in CHAINS.items()},
        "filters": filters,
        "per_record": rows,
        "cold_start": {k: round(v, 3) for k, v in cold.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
