"""The hostile corpus (tests/helpers/hostile.py) in-process, each module next to a healthy
stage under every on_error policy: the healthy readings all come out, the hostile stage's
readings are passed on or dead-lettered (never lost), and no entry point -- process,
snapshot, restore, flush -- ever raises out of the chain."""

from __future__ import annotations

import pytest

from core._errors import FilterLoadError
from core._metrics import METRICS
from core._model import Batch, SeriesRegistry
from pipeline.chain._chain import Chain
from pipeline.chain._module import MAX_FUNCTION_BYTES
from tests.helpers import hostile
from tests.helpers.wasm import REPO, stage, write_wat


def build(stages, reg):
    return Chain.build(stages, reg, base_dir=REPO, cache_dir=None)


def mixed(reg: SeriesRegistry, k: int) -> Batch:
    good, evil = reg.intern("good", "T"), reg.intern("evil", "T")
    n = 6
    return Batch(
        [1000 * (10 * k + i) for i in range(n)],
        [float(10 * k + i) for i in range(n)],
        [good if i % 2 else evil for i in range(n)],
    )


def chain_of(tmp_path, name, policy):
    fields, limits = hostile.RUNTIME[name]
    mod = hostile.write(tmp_path, name)
    return [
        stage("hostile", mod, "filter_map", on_error=policy, match={"devices": ["evil"]}, **limits),
        stage("healthy", "ema", "map", {"alpha": 1.0}),
    ]


@pytest.mark.parametrize("policy", ["dead_letter", "pass", "stop"])
@pytest.mark.parametrize("name", sorted(hostile.RUNTIME))
def test_hostile_module_never_costs_a_healthy_reading(tmp_path, name, policy):
    reg = SeriesRegistry()
    stages = chain_of(tmp_path, name, policy)
    good = reg.intern("good", "T")
    with build(stages, reg) as chain:
        saved = None
        for k in range(4):
            b = mixed(reg, k)
            res = chain.process(b)
            out = list(zip(res.batch.series, res.batch.value, strict=True))
            want_good = [(s, v) for s, v in zip(b.series, b.value, strict=True) if s == good]
            assert [x for x in out if x[0] == good] == want_good  # every healthy reading
            evil_in = sum(1 for s in b.series if s != good)
            evil_out = sum(1 for s, _ in out if s != good)
            dead = sum(len(Batch.unpack(d.payload)) for d in res.dead_letters)
            assert evil_out + dead == evil_in  # nothing lost
            assert chain.stopped is None
            saved = chain.snapshot()  # never raises
        flushed = chain.flush()  # never raises
        assert not len(flushed.batch) or set(flushed.batch.series) <= {good}
    # a restart: the saved state into a new chain (a refusing restore only drops it)
    reg2 = SeriesRegistry(reg.key(i) for i in range(len(reg)))
    with build(stages, reg2) as again:
        again.restore(saved or {})
        res = again.process(mixed(reg2, 9))
        assert sum(1 for s in res.batch.series if s == good) == 3
        hand = build(stages, reg2)
        again.hand_over(hand)  # flush + snapshot + restore on a deploy: never raises
        hand.close()


@pytest.mark.parametrize("name", ["restore_refuses", "restore_trap", "restore_bad_alloc"])
def test_a_state_that_cannot_be_restored_is_dropped_and_counted(tmp_path, name):
    reg = SeriesRegistry()
    stages = chain_of(tmp_path, name, "dead_letter")
    before = METRICS.value("edgepipe_stage_state_dropped_total", stage="hostile", reason="restore")
    with build(stages, reg) as chain:
        chain.restore({"hostile": b"12345678"})
        d = chain.describe()[0]
        assert d["state_dropped"] == 1 and d["consecutive_failures"] == 1 and d["state_bytes"] == 0
        assert len(chain.process(mixed(reg, 0)).batch) == 6  # and it runs, cold
    after = METRICS.value("edgepipe_stage_state_dropped_total", stage="hostile", reason="restore")
    assert after == before + 1


def test_a_state_that_cannot_be_saved_fails_the_stage_and_trips_its_breaker(tmp_path):
    reg = SeriesRegistry()
    mod = hostile.write(tmp_path, "snapshot_trap")
    st = stage("hostile", mod, "filter_map", on_error="pass", breaker_failures=2)
    before = METRICS.value("edgepipe_stage_state_dropped_total", stage="hostile", reason="snapshot")
    with build([st], reg) as chain:
        for k in range(2):
            assert len(chain.process(mixed(reg, k)).batch) == 6  # passed on
        d = chain.describe()[0]
        assert d["breaker"] == "open" and d["last_code"] == "unreachable"
        assert METRICS.value("edgepipe_stage_breaker_open", stage="hostile") == 1
        assert METRICS.value("edgepipe_stage_failing", stage="hostile", code="unreachable") == 1
        assert chain.snapshot() == {}  # nothing to save; never raises
    assert METRICS.value("edgepipe_stage_breaker_open", stage="hostile") == 0  # closed chain
    after = METRICS.value("edgepipe_stage_state_dropped_total", stage="hostile", reason="snapshot")
    assert after >= before + 2


def test_stage_dead_letters_are_counted_by_stage_and_reason(tmp_path):
    reg = SeriesRegistry()
    stages = chain_of(tmp_path, "process_trap", "dead_letter")
    before = METRICS.value("edgepipe_dead_letters_total", stage="hostile", reason="unreachable")
    with build(stages, reg) as chain:
        assert len(chain.process(mixed(reg, 0)).dead_letters) == 1
    after = METRICS.value("edgepipe_dead_letters_total", stage="hostile", reason="unreachable")
    assert after == before + 1


def test_a_deploy_resets_the_breaker_gauge_of_the_replaced_stage(tmp_path):
    reg = SeriesRegistry()
    mod = hostile.write(tmp_path, "process_trap")
    old = build([stage("s", mod, "filter_map", breaker_failures=1)], reg)
    old.process(mixed(reg, 0))
    assert METRICS.value("edgepipe_stage_breaker_open", stage="s") == 1
    new = build([stage("s", "ema", "map")], reg)
    old.hand_over(new)
    assert METRICS.value("edgepipe_stage_breaker_open", stage="s") == 0
    assert METRICS.value("edgepipe_stage_failing", stage="s") == 0
    new.close()


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_an_instance_that_grew_is_recycled_and_its_memory_returns(tmp_path):
    # on a batch starting with a negative value: grow to 14 MiB, touch every page, succeed
    grow = (
        f"(if {hostile.NEGATIVE} (then (drop (memory.grow (i32.const 220)))"
        " (memory.fill (i32.const 131072) (i32.const 1) (i32.const 14417920))))"
        f" {hostile.IDENTITY}"
    )
    mod = write_wat(tmp_path, "grow", hostile.module(process=grow))
    reg = SeriesRegistry()
    sid = reg.intern("d", "T")
    with build([stage("g", mod, "filter_map")], reg) as chain:
        chain.process(Batch([1], [1.0], [sid]))
        chain.process(Batch([2], [2.0], [sid]))
        before = _rss_kb()
        out = chain.process(Batch([3, 4], [-1.0, 5.0], [sid, sid]))
        after = _rss_kb()
        assert out.batch.value == [-1.0, 5.0]
        d = chain.describe()[0]
        assert d["recycles"] == 1 and d["instances"] == 2
        assert d["memory_bytes"] == 2 * 65536  # back to its steady size
        print(f"RSS before the grow bomb {before} KiB, after it (recycled) {after} KiB")
        assert after - before < 4096  # the 14 MiB the guest touched went back
        assert chain.process(Batch([5], [6.0], [sid])).batch.value == [6.0]


def test_a_huge_function_is_refused_before_it_is_compiled(tmp_path):
    mod = hostile.huge_module(tmp_path / "huge.wasm", MAX_FUNCTION_BYTES + 3)
    with pytest.raises(FilterLoadError) as ei:
        build([stage("huge", mod, "filter")], SeriesRegistry())
    assert ei.value.code == "too_large" and "function body" in ei.value.message


@pytest.mark.parametrize("name", sorted(hostile.AT_LOAD))
def test_a_failing_init_is_refused_at_load_with_its_code(tmp_path, name):
    mod = hostile.write(tmp_path, name)
    with pytest.raises(FilterLoadError) as ei:
        build([stage("i", mod, "filter_map", {"x": 1}, fuel=100_000)], SeriesRegistry())
    assert ei.value.code == hostile.AT_LOAD[name][1]


# -- trap messages: the trap code and the guest's backtrace, wherever the failure shows ----------
def _deep_trap(tmp_path, entry: str):
    mod = write_wat(
        tmp_path,
        f"deep_{entry}",
        hostile.module(extra=hostile.TWO_DEEP, **{entry: hostile.DEEP_ENTRY[entry]}),
    )
    return stage("deep", mod, "filter_map", {"x": 1}, on_error="dead_letter", breaker_failures=1)


@pytest.mark.parametrize("entry", sorted(hostile.DEEP_ENTRY))
def test_a_trap_keeps_its_code_and_the_guests_backtrace(tmp_path, caplog, entry):
    reg = SeriesRegistry()
    st = _deep_trap(tmp_path, entry)
    if entry == "init":  # refused at load, with the cause and where
        with pytest.raises(FilterLoadError) as ei:
            build([st], reg)
        assert ei.value.code == "unreachable"
        hostile.assert_trap_text(str(ei.value), entry)
        return
    with build([st], reg) as chain:
        if entry == "restore":
            chain.restore({"deep": b"12345678"})
            dead = []
        elif entry == "flush":
            dead = chain.flush().dead_letters
        else:
            dead = chain.process(mixed(reg, 0)).dead_letters
        d = chain.describe()[0]
        # describe() (what /readyz says of a tripped stage) and the log line
        assert d["last_code"] == "unreachable" and d["breaker"] == "open"
        assert d["last_error"].startswith("unreachable: ")
        hostile.assert_trap_text(d["last_error"], entry)
        hostile.assert_trap_text(caplog.text, entry)
        # the dead letter (process, and snapshot which fails the batch)
        if entry in ("process", "snapshot"):
            (dl,) = dead
            assert dl.reason.startswith("stage deep: trap: unreachable: ")
            hostile.assert_trap_text(dl.reason, entry)
        # metric labels carry the code only (bounded cardinality), never the text
        assert METRICS.value("edgepipe_stage_failing", stage="deep", code="unreachable") == 1


#: Function names a hostile module's name section may carry: a fake "Caused by:" with a
#: huge tail (which took the place of the trap's real cause), a new log line, terminal
#: escapes and bidi controls (which reorder what an operator reads).
HOSTILE_NAMES = {
    8: "inner\nCaused by:\n" + "X" * 200_000 + "\x1b[31m\u202e",
    9: "mid\r\n2026-01-01 00:00:00 CRITICAL forged log line\u2067",
}


def test_hostile_function_names_reach_no_message_raw_or_unbounded(tmp_path, caplog):
    mod = write_wat(
        tmp_path,
        "named",
        hostile.module(extra=hostile.TWO_DEEP, **{"process": hostile.DEEP_ENTRY["process"]}),
    )
    hostile.renamed(mod, HOSTILE_NAMES)
    st = stage("named", mod, "filter_map", {"x": 1}, on_error="dead_letter", breaker_failures=1)
    reg = SeriesRegistry()
    with build([st], reg) as chain:
        (dl,) = chain.process(mixed(reg, 0)).dead_letters
        d = chain.describe()[0]
    (logged,) = [r.getMessage() for r in caplog.records if "(unreachable)" in r.getMessage()]
    for text in (d["last_error"], dl.reason, logged):
        # the trap's own cause, not the text the module chose
        assert (
            "trap (unreachable): wasm `unreachable` instruction executed; wasm backtrace: " in text
        )
        assert not any(c in text for c in "\r\n\x1b\u202e\u2067"), repr(text[:300])
        assert "XXXX" in text and len(text) < 2000, len(text)
    # each name is shown escaped and cut short: the operator sees what it was
    assert "inner\\nCaused by:\\nXXX" in d["last_error"]
    assert "mid\\r\\n2026-01-01" in d["last_error"]
