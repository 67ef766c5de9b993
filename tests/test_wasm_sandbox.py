"""Hostile and broken modules: refused at load, or contained at run time while healthy
stages and later batches keep working."""

from __future__ import annotations

import hashlib

import pytest

from core._clock import ManualClock
from core._errors import FilterLoadError
from core._metrics import METRICS
from core._model import Batch, SeriesRegistry
from pipeline.chain._chain import Chain
from pipeline.chain._stage import WasmStage
from tests.helpers.edge import wait_for
from tests.helpers.wasm import LIB, REPO, stage, wat_module, write_wat

IDENTITY = "(i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.extend_i32_u (local.get 0)))"

HOSTILE = {
    # name: (process body, extra module fields, stage limits, expected code)
    "infinite_loop_epoch": (
        "(loop $l (br $l)) (unreachable)",
        "",
        {"fuel": None, "timeout_ms": 20},
        "timeout",
    ),
    "infinite_loop_fuel": ("(loop $l (br $l)) (unreachable)", "", {"fuel": 100_000}, "out_of_fuel"),
    "memory_grow_bomb": (
        "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) (unreachable)",
        "",
        {"memory_mb": 2},
        "unreachable",
    ),
    "deep_recursion": (
        "(drop (call $r (i32.const 0))) (i64.const 0)",
        "(func $r (param i32) (result i32) (i32.add (call $r (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))",
        {},
        "stack_overflow",
    ),
    "out_of_bounds_output": (
        "(i64.or (i64.shl (i64.const 0x7fff0000) (i64.const 32)) (i64.extend_i32_u (local.get 0)))",
        "",
        {},
        "output_pointer",
    ),
    "absurd_output_count": (
        "(i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 0xffffffff))",
        "",
        {},
        "output_count",
    ),
    "guest_error": ("(i64.const -7)", "", {}, "guest_error_7"),
    "unknown_series": (
        f"(i32.store (i32.const 1040) (i32.const 99999)) {IDENTITY}",
        "",
        {},
        "unknown_series",
    ),
    "filter_changes_value": (
        f"(f64.store (i32.const 1032) (f64.const 1e9)) {IDENTITY}",
        "",
        {},
        "kind_violation",
    ),
}


@pytest.fixture
def reg():
    r = SeriesRegistry()
    r.intern("dev", "T")
    r.intern("dev", "RH")
    return r


def sample(n: int = 5, start: int = 0) -> Batch:
    return Batch(
        [1000 * (start + i) for i in range(n)],
        [20.0 + i for i in range(n)],
        [i % 2 for i in range(n)],
    )


def build(tmp_path, stages, reg, **kw):
    return Chain.build(stages, reg, base_dir=REPO, cache_dir=tmp_path / "aot", **kw)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_stage_is_contained_and_next_stage_works(tmp_path, reg, name):
    body, extra, limits, code = HOSTILE[name]
    mod = write_wat(tmp_path, name, wat_module(body, extra=extra))
    kind = "filter_map" if name == "unknown_series" else "filter"  # a filter: kind_violation
    stages = [
        stage("hostile", mod, kind, **limits),
        stage("ema", "ema", "map", {"alpha": 0.5}),
    ]
    errors_before = METRICS.value("edgepipe_stage_errors_total", stage="hostile", code=code)
    with build(tmp_path, stages, reg) as chain:
        b = sample()
        res = chain.process(b)
        assert len(res.batch) == 0
        [dl] = res.dead_letters
        assert dl.stage == "hostile" and dl.topic == ""
        assert dl.reason.startswith(f"stage hostile: trap: {code}: ")
        assert Batch.unpack(dl.payload).value == b.value  # nothing lost
        assert chain.stopped is None
        desc = {d["name"]: d for d in chain.describe()}
        assert desc["hostile"]["failures"] == 1
        assert desc["hostile"]["instances"] == 2  # re-instantiated after the failure
        assert desc["hostile"]["last_error"].startswith(code)
    assert (
        METRICS.value("edgepipe_stage_errors_total", stage="hostile", code=code)
        == errors_before + 1
    )

    # with on_error=pass the records skip the broken stage and reach the healthy one
    stages[0] = stage("hostile", mod, kind, on_error="pass", **limits)
    with build(tmp_path, stages, reg) as chain:
        for k in range(3):
            res = chain.process(sample(4, start=10 * k))
            assert not res.dead_letters
            assert len(res.batch) == 4 and res.batch.ts == sample(4, start=10 * k).ts
        assert chain.describe()[0]["failures"] == 3
        assert chain.describe()[1]["failures"] == 0


def test_memory_cap_holds(tmp_path, reg):
    # grows until refused, then reports success with no output
    body = "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) (i64.shl (i64.const 1024) (i64.const 32))"
    mod = write_wat(tmp_path, "grow", wat_module(body))
    st = WasmStage(stage("grow", mod, "filter", memory_mb=1), reg, base_dir=REPO)
    assert len(st.process(sample())) == 0
    assert st._mem.memory.data_len(st._store) == 1024 * 1024


def test_trap_in_some_batches_only(tmp_path, reg):
    # traps on batches of exactly 3 records; the instance is rebuilt and later batches work
    body = f"(if (i32.eq (local.get 0) (i32.const 3)) (then (unreachable))) {IDENTITY}"
    mod = write_wat(tmp_path, "flaky", wat_module(body))
    with build(tmp_path, [stage("flaky", mod, "filter_map")], reg) as chain:
        assert len(chain.process(sample(2)).batch) == 2
        res = chain.process(sample(3))
        assert res.dead_letters[0].reason.startswith("stage flaky: trap: unreachable: ")
        assert chain.process(sample(4)).batch.value == sample(4).value


def test_on_error_stop_quarantines_after_bounded_attempts(tmp_path, reg):
    # traps on every batch: tried stop_attempts times (a fresh instance each), then the
    # stage's input is quarantined as one dead letter and the chain goes on
    mod = write_wat(tmp_path, "trap", wat_module("(unreachable)"))
    before = METRICS.value("edgepipe_stage_quarantined_total", stage="t")
    dl_before = METRICS.value("edgepipe_dead_letters_total", stage="t", reason="quarantined")
    with build(
        tmp_path, [stage("t", mod, "filter", on_error="stop", stop_attempts=4)], reg
    ) as chain:
        b = sample()
        res = chain.process(b)
        assert len(res.batch) == 0
        [dl] = res.dead_letters
        assert dl.reason.startswith("stage t: quarantined after 4 attempts: unreachable: ")
        assert Batch.unpack(dl.payload).value == b.value  # nothing lost
        assert chain.stopped is None
        d = chain.describe()[0]
        assert d["failures"] == 4 and d["instances"] == 5 and d["quarantined"] == 5
        assert chain.process(sample(3)).dead_letters  # the next batch is handled alike
    assert METRICS.value("edgepipe_stage_quarantined_total", stage="t") == before + 8
    assert (
        METRICS.value("edgepipe_dead_letters_total", stage="t", reason="quarantined")
        == dl_before + 2
    )


def test_circuit_breaker_trips_and_recovers(tmp_path, reg):
    # traps whenever the first record's value is negative
    body = (
        f"(if (f64.lt (f64.load (i32.const 1032)) (f64.const 0)) (then (unreachable))) {IDENTITY}"
    )
    mod = write_wat(tmp_path, "neg", wat_module(body))
    bad = Batch([1], [-1.0], [0])
    st = stage("neg", mod, "filter", breaker_failures=3, breaker_cooldown_s=30)
    clock = ManualClock()
    with build(tmp_path, [st], reg, clock=clock) as chain:
        for _ in range(3):
            assert chain.process(bad).dead_letters
        d = chain.describe()[0]
        assert d["breaker"] == "open" and d["instances"] == 4
        assert METRICS.value("edgepipe_stage_breaker_open", stage="neg") == 1
        # while open, even a good batch takes the on_error path without calling the guest
        res = chain.process(sample())
        assert res.dead_letters[0].reason.startswith("stage neg: trap: breaker_open: ")
        assert chain.describe()[0]["instances"] == 4
        clock.advance(29.9)
        assert chain.describe()[0]["breaker"] == "open"
        assert chain.process(sample()).dead_letters  # still open: the guest is not called
        clock.advance(0.2)
        assert chain.describe()[0]["breaker"] == "half_open"
        assert chain.process(sample()).batch.value == sample().value
        assert chain.describe()[0]["breaker"] == "closed"
        assert METRICS.value("edgepipe_stage_breaker_open", stage="neg") == 0


def test_stateful_stage_restored_after_trap(tmp_path, reg):
    # ema with so little fuel that a big batch runs out mid-way: the half-updated
    # instance is replaced and its state restored from the last good snapshot
    st = stage("ema", "ema", "map", {"alpha": 0.5}, fuel=20_000)
    small = [Batch([i], [float(i)], [0]) for i in range(5)]
    big = Batch(list(range(100, 2100)), [1e6] * 2000, [0] * 2000)
    with build(tmp_path, [st], reg) as chain:
        outs = [chain.process(b).batch.value[0] for b in small[:3]]
        res = chain.process(big)
        assert res.dead_letters and res.dead_letters[0].reason.startswith(
            "stage ema: trap: out_of_fuel: "
        )
        outs += [chain.process(b).batch.value[0] for b in small[3:]]
    ema, want = None, []
    for b in small:
        v = b.value[0]
        ema = v if ema is None else ema + 0.5 * (v - ema)
        want.append(ema)
    assert outs == want


# -- refused at load -------------------------------------------------------------------


def refused(tmp_path, reg, st) -> FilterLoadError:
    with pytest.raises(FilterLoadError) as ei:
        build(tmp_path, [st], reg)
    assert ei.value.stage == st.name
    return ei.value


def test_refuses_missing_exports(tmp_path, reg):
    text = wat_module().replace('(export "ep_process")', "")
    e = refused(tmp_path, reg, stage("m", write_wat(tmp_path, "m", text), "filter"))
    assert e.code == "missing_export" and "ep_process" in e.message


def test_refuses_wrong_export_type(tmp_path, reg):
    text = wat_module().replace(
        '(func (export "ep_input") (param i32) (result i32)',
        '(func (export "ep_input") (param i64) (result i32)',
    )
    e = refused(tmp_path, reg, stage("m", write_wat(tmp_path, "m", text), "filter"))
    assert e.code == "bad_export" and "ep_input" in e.message


def test_refuses_wrong_abi_version(tmp_path, reg):
    e = refused(
        tmp_path, reg, stage("v", write_wat(tmp_path, "v", wat_module(version=2)), "filter")
    )
    assert e.code == "abi_version" and "returned 2" in e.message


@pytest.mark.parametrize(
    "imp",
    [
        '(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))',
        '(import "edgepipe" "spawn" (func (param i32)))',
        '(import "edgepipe" "log" (func (param i64)))',
        '(import "env" "mem" (memory 1))',
    ],
)
def test_refuses_imports_not_granted(tmp_path, reg, imp):
    e = refused(
        tmp_path, reg, stage("i", write_wat(tmp_path, "i", wat_module(imports=imp)), "filter")
    )
    assert e.code == "import_denied"


def test_refuses_module_over_size_limit(tmp_path, reg):
    e = refused(tmp_path, reg, stage("big", "validity", "filter", module_max_kb=1))
    assert e.code == "too_large"


def test_sha256_pin(tmp_path, reg):
    digest = hashlib.sha256((LIB / "ema.wasm").read_bytes()).hexdigest()
    with build(tmp_path, [stage("ema", "ema", "map", sha256=digest)], reg):
        pass
    e = refused(tmp_path, reg, stage("ema", "ema", "map", sha256="0" * 64))
    assert e.code == "sha256_mismatch" and digest in e.message


@pytest.mark.parametrize(
    ("init", "code"),
    [
        ("(unreachable)", "unreachable"),
        ("(i32.const -1)", "init"),
        ("(loop $l (br $l)) (i32.const 0)", "out_of_fuel"),
    ],
)
def test_refuses_failing_init(tmp_path, reg, init, code):
    mod = write_wat(tmp_path, "init", wat_module(init_body=init))
    e = refused(tmp_path, reg, stage("init", mod, "filter", fuel=100_000))
    assert e.code == code


def test_refuses_bad_config_value_before_the_guest(tmp_path, reg):
    # ema declares alpha in (0, 1]: the host refuses 7 before ep_init runs (a guest's own
    # refusal is test_refuses_failing_init's "init" case)
    e = refused(tmp_path, reg, stage("ema", "ema", "map", {"alpha": 7}))
    assert e.code == "bad_config"
    assert e.message == "config.alpha: 7 is out of range (must be > 0 and <= 1)"


def test_refuses_start_function_that_never_returns(tmp_path, reg):
    extra = "(func $s (loop $l (br $l))) (start $s)"
    mod = write_wat(tmp_path, "start", wat_module(extra=extra))
    e = refused(tmp_path, reg, stage("start", mod, "filter", fuel=None, timeout_ms=10))
    assert e.code == "timeout"


def test_refuses_non_wasm_and_missing_files(tmp_path, reg):
    bad = tmp_path / "x.wasm"
    bad.write_bytes(b"not wasm at all")
    assert refused(tmp_path, reg, stage("x", bad, "filter")).code == "not_wasm"
    assert refused(tmp_path, reg, stage("x", tmp_path / "nope.wasm", "filter")).code == "unreadable"


def test_map_must_keep_records(tmp_path, reg):
    body = "(i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.extend_i32_u (i32.sub (local.get 0) (i32.const 1))))"
    mod = write_wat(tmp_path, "short", wat_module(body))
    with build(tmp_path, [stage("short", mod, "map")], reg) as chain:
        res = chain.process(sample())
        assert res.dead_letters[0].reason.startswith("stage short: trap: kind_violation: ")


def test_epoch_ticker_parks_when_idle(tmp_path, reg):
    from pipeline.chain._engine import TICKER

    with build(tmp_path, [stage("ema", "ema", "map")], reg) as chain:
        parks = TICKER.parks
        chain.process(sample())
        # the calls woke the ticker; with no guest call in flight it parks again (no ticking).
        # A batch is several guest calls (process, snapshot), each of which may wake it: it
        # parks after the first and may wake once more for the next before it parks for good.
        assert TICKER.wait_parked(parks, 30)
        wait_for(lambda: TICKER.parked, 30, "the ticker parked after the last guest call")
    # and it does tick while a guest runs (the epoch deadline depends on it)
    mod = write_wat(tmp_path, "spin", wat_module("(loop $l (br $l)) (unreachable)"))
    with build(tmp_path, [stage("spin", mod, "filter", fuel=None, timeout_ms=10)], reg) as chain:
        before = TICKER.ticks
        assert (
            chain.process(sample()).dead_letters[0].reason.startswith("stage spin: trap: timeout: ")
        )
        assert TICKER.ticks > before


def test_deadline_is_set_again_once_the_epoch_moved(tmp_path, reg):
    # a batch re-sets its stage's deadline only when the ticker moved the epoch since the
    # last one did: moved past the deadline the last batch set, the next batch must still
    # get its whole timeout (a stale deadline would trap it at once)
    from pipeline.chain._engine import TICKER, engine

    mod = write_wat(tmp_path, "ident", wat_module(IDENTITY))
    with build(tmp_path, [stage("ident", mod, "map", fuel=None, timeout_ms=10)], reg) as chain:
        assert not chain.process(sample()).dead_letters
        for _ in range(50):  # 50 ticks: five times the 10 ms timeout
            engine().increment_epoch()
            TICKER.ticks += 1
        assert not chain.process(sample()).dead_letters
        assert len(chain.process(sample()).batch) == len(sample())


#: ep_input bodies: where the host is to write the batch
INPUT_BUFFERS = {
    # past the end of its 2 pages: refused, nothing written
    "beyond_memory": ("(i32.const 131000)", "alloc"),
    "null": ("(i32.const 0)", "alloc"),
    # grows its memory by a page and hands out the new page: the host, which last saw
    # 2 pages, must look again and write there
    "in_a_page_it_just_grew": (
        "(drop (memory.grow (i32.const 1))) (i32.const 131072)",
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(INPUT_BUFFERS))
def test_input_buffer_is_checked_against_memory_as_it_is(tmp_path, reg, name):
    body, code = INPUT_BUFFERS[name]
    # a map that hands back what the host wrote at the buffer ep_input gave
    text = wat_module(
        "(i64.or (i64.shl (i64.extend_i32_u (global.get $buf)) (i64.const 32))"
        " (i64.extend_i32_u (local.get 0)))",
        extra="(global $buf (mut i32) (i32.const 0))",
    ).replace(
        '(func (export "ep_input") (param i32) (result i32) (i32.const 1024))',
        f'(func (export "ep_input") (param i32) (result i32) (global.set $buf {body}) '
        "(global.get $buf))",
    )
    mod = write_wat(tmp_path, name, text)
    with build(tmp_path, [stage("buf", mod, "map", memory_mb=4)], reg) as chain:
        res = chain.process(sample())
        if code is None:
            assert not res.dead_letters
            assert res.batch.raw == sample().raw
        else:
            assert not res.batch
            assert res.dead_letters[0].reason.startswith(f"stage buf: trap: {code}: ")
            assert "returned an unusable buffer" in res.dead_letters[0].reason


def test_memory_a_snapshot_grew_is_recycled(tmp_path, reg):
    # ep_snapshot runs after the batch's output was read: memory it grows (10 MiB here,
    # past RECYCLE_SLACK) while returning no state must still get the instance recycled
    snap_grows = (
        '(func (export "ep_snapshot") (result i64) (drop (memory.grow (i32.const 160)))'
        " (i64.const 0))"
        '(func (export "ep_restore") (param i32 i32) (result i32) (i32.const 0))'
    )
    mod = write_wat(tmp_path, "snap", wat_module(IDENTITY, extra=snap_grows))
    with build(tmp_path, [stage("snap", mod, "map", memory_mb=64)], reg) as chain:
        assert not chain.process(sample()).dead_letters
        assert chain.describe()[0]["recycles"] == 1


def test_start_function_calling_the_host_is_refused(tmp_path, reg):
    # a start function runs before the instance (and its memory) is the host's: a host
    # function it calls traps with a code, it does not break the host
    extra = "(func $s (call $log (i32.const 0) (i32.const 0) (i32.const 4))) (start $s)"
    imports = '(import "edgepipe" "log" (func $log (param i32 i32 i32)))'
    mod = write_wat(tmp_path, "startlog", wat_module(extra=extra, imports=imports))
    assert refused(tmp_path, reg, stage("startlog", mod, "filter")).code == "no_memory"


def test_config_flattening():
    from pipeline.chain._abi import flatten_config

    text = flatten_config(
        {"a": 1, "b": {"c": [1, 2.5], "d": True}, "e": None, "f": "x y", "g": 0.1}
    )
    assert text == "a=1\nb.c=1,2.5\nb.d=true\ne=\nf=x y\ng=0.1\n"
    with pytest.raises(ValueError):
        flatten_config({"bad": "two\nlines"})


HOST_IMPORTS = """
  (import "edgepipe" "series_derive" (func $derive (param i32 i32 i32) (result i32)))
  (import "edgepipe" "series_name" (func $name (param i32 i32 i32 i32) (result i32)))
  (import "edgepipe" "log" (func $log (param i32 i32 i32)))
"""


def test_host_imports(tmp_path, reg, caplog):
    # record 0: series := derive(series, "_x"); record 1: value := series_name(99999) (-1);
    # record 2: value := len(metric of its series), name copied to 600
    body = f"""
      (call $log (i32.const 1) (i32.const 512) (i32.const 2))
      (i32.store (i32.const 1040)
        (call $derive (i32.load (i32.const 1040)) (i32.const 512) (i32.const 2)))
      (f64.store (i32.const 1056)
        (f64.convert_i32_s (call $name (i32.const 99999) (i32.const 1) (i32.const 600) (i32.const 16))))
      (f64.store (i32.const 1080)
        (f64.convert_i32_s (call $name (i32.load (i32.const 1088)) (i32.const 1) (i32.const 600) (i32.const 16))))
      (if (i32.ne (i32.load8_u (i32.const 600)) (i32.const 82)) (then (unreachable)))  ;; "R"
      {IDENTITY}"""
    extra = '(data (i32.const 512) "_x")'
    mod = write_wat(tmp_path, "host", wat_module(body, extra=extra, imports=HOST_IMPORTS))
    with build(tmp_path, [stage("host", mod, "filter_map")], reg) as chain:
        with caplog.at_level("INFO", logger="edgepipe.filter"):
            out = chain.process(Batch([1, 2, 3], [0.0, 0.0, 0.0], [0, 0, 1])).batch
    assert reg.key(out.series[0]).metric == "T_x"
    assert out.value[1:] == [-1.0, 2.0]  # unknown id; len("RH")
    assert "stage host: _x" in caplog.text

    body = f"(drop (call $derive (i32.const 99999) (i32.const 512) (i32.const 2))) {IDENTITY}"
    mod = write_wat(tmp_path, "bad", wat_module(body, extra=extra, imports=HOST_IMPORTS))
    with build(tmp_path, [stage("bad", mod, "filter_map")], reg) as chain:
        res = chain.process(sample())
        assert res.dead_letters[0].reason.startswith("stage bad: trap: unknown_series: ")
        # a name buffer outside guest memory traps too
    body = f"(drop (call $name (i32.const 0) (i32.const 0) (i32.const 0x7ffffff0) (i32.const 16))) {IDENTITY}"
    mod = write_wat(tmp_path, "oob", wat_module(body, imports=HOST_IMPORTS))
    with build(tmp_path, [stage("oob", mod, "filter_map")], reg) as chain:
        assert (
            chain.process(sample())
            .dead_letters[0]
            .reason.startswith("stage oob: trap: out_of_bounds: ")
        )


@pytest.mark.parametrize(
    ("store", "what"),
    [
        ("(f64.store (i32.const 1032) (f64.div (f64.const 0) (f64.const 0)))", "NaN"),
        ("(f64.store (i32.const 1032) (f64.div (f64.const 1) (f64.const 0)))", "inf"),
        ("(f64.store (i32.const 1032) (f64.const -1e300))", "beyond 1e250"),
        ("(i64.store (i32.const 1024) (i64.const 0))", "ts 1970"),
        ("(i64.store (i32.const 1024) (i64.const 9223372036854775807))", "ts 2**63-1"),
    ],
)
@pytest.mark.parametrize("on_error", ["dead_letter", "pass"])
def test_out_of_range_output_is_a_stage_failure(tmp_path, reg, store, what, on_error):
    """A stage whose output the receiver would refuse for ever (a NaN, an infinity, a value
    beyond +-1e250, a timestamp moved outside 2000..2100) fails under its policy, instead of
    being stored and blocking the device's sync."""
    mod = write_wat(tmp_path, "bad", wat_module(f"{store} {IDENTITY}"))
    before = METRICS.value("edgepipe_stage_errors_total", stage="bad", code="bad_value")
    b = Batch([1_700_000_000_000 + i for i in range(4)], [1.0, 2.0, 3.0, 4.0], [0, 1, 0, 1])
    kind = "filter_map"  # may change values and timestamps (a map keeping ts is checked too)
    with build(tmp_path, [stage("bad", mod, kind, on_error=on_error)], reg) as chain:
        res = chain.process(b)
    assert METRICS.value("edgepipe_stage_errors_total", stage="bad", code="bad_value") == before + 1
    if on_error == "dead_letter":
        assert len(res.batch) == 0
        assert "bad_value" in res.dead_letters[0].reason
    else:
        assert res.batch.pack() == b.pack() and not res.dead_letters


def test_a_filter_output_is_not_range_checked_twice(tmp_path, reg):
    """A filter's output is part of its input, which the decoder checked: an input outside
    the ranges (as from an older store) passes a filter unchanged."""
    mod = write_wat(tmp_path, "keep", wat_module(IDENTITY))
    b = Batch([5], [float("inf")], [0])
    with build(tmp_path, [stage("keep", mod, "filter")], reg) as chain:
        res = chain.process(b)
    assert res.batch.pack() == b.pack() and not res.dead_letters


def test_timestamps_are_checked_against_the_inputs_own_range(tmp_path, reg):
    """A stage given readings stamped before 2000 may keep them there (it did not move them)."""
    mod = write_wat(tmp_path, "same", wat_module(IDENTITY))
    b = Batch([1000, 2000], [1.0, 2.0], [0, 1])
    with build(tmp_path, [stage("same", mod, "filter_map")], reg) as chain:
        res = chain.process(b)
    assert res.batch.pack() == b.pack() and not res.dead_letters


def test_a_stage_passing_on_a_bad_value_it_was_given_is_not_failed(tmp_path, reg):
    mod = write_wat(tmp_path, "same", wat_module(IDENTITY))
    b = Batch([1_700_000_000_000, 1_700_000_000_001], [float("nan"), 2.0], [0, 1])
    with build(tmp_path, [stage("same", mod, "map")], reg) as chain:
        res = chain.process(b)
    assert res.batch.pack() == b.pack() and not res.dead_letters
