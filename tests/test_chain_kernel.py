"""The chain's host-side check kernel (pipeline/chain/_check.py): a stage's ``match:``
split done there in one call per batch, one kernel per chain, its memory let go after an
oversized batch, and its module loaded from the AOT cache like a stage's."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

from core._model import RECORD, Batch, Flags, SeriesRegistry
from pipeline.chain._chain import Chain
from pipeline.chain._check import KEEP_BYTES, OutputCheck
from tests.helpers.wasm import REPO, stage

CAL = {"scale": {"T": 2.0, "RH": 3.0, "CO_GT": 5.0}}


def build(stages, registry: SeriesRegistry, tmp_path: Path) -> Chain:
    return Chain.build(stages, registry, base_dir=REPO, cache_dir=tmp_path / "aot")


def readings(reg: SeriesRegistry, devices: list[str], n: int, t0: int) -> Batch:
    """``n`` rows of T, RH and CO_GT per device, interleaved, values 1, 2, 3, ..."""
    b = Batch()
    v = 1.0
    for i in range(n):
        for dev in devices:
            for m in ("T", "RH", "CO_GT"):
                b.append(t0 + i * 1000, v, reg.intern(dev, m), i % 3)
                v += 1
    return b


def expected(b: Batch, reg: SeriesRegistry, devices, metrics) -> list[tuple]:
    """The calibrate stage on the matched records, then the others, each in order."""
    hit, rest = [], []
    for ts, v, sid, fl in b.rows():
        key = reg.key(sid)
        ok = (devices is None or any(fnmatch.fnmatchcase(key.device, p) for p in devices)) and (
            metrics is None or any(fnmatch.fnmatchcase(key.metric, p) for p in metrics)
        )
        if ok:
            hit.append((ts, v * CAL["scale"][key.metric], sid, fl | Flags.CALIBRATED))
        else:
            rest.append((ts, v, sid, fl))
    return hit + rest


def test_match_splits_by_device_and_metric_patterns_as_the_registry_grows(tmp_path):
    reg = SeriesRegistry()
    devices, metrics = ["kit-*", "lab"], ["T", "R?"]
    st = stage("cal", "calibrate", "map", CAL, match={"devices": devices, "metrics": metrics})
    with build([st], reg, tmp_path) as ch:
        # each batch brings series the stage has not seen yet: its table grows with them
        for i, devs in enumerate(
            [["kit-1", "other"], ["lab", "kit-2", "other"], ["kit-3", "labx", "kit-1"]]
        ):
            b = readings(reg, devs, 40, 1_700_000_000_000 + i * 10**6)
            got = ch.process(b)
            assert not got.dead_letters
            assert list(got.batch.rows()) == expected(b, reg, devices, metrics)


def test_a_batch_all_matched_or_none_matched_is_passed_whole(tmp_path):
    reg = SeriesRegistry()
    st = stage("cal", "calibrate", "map", CAL, match={"devices": ["a"]})
    with build([st], reg, tmp_path) as ch:
        none = readings(reg, ["b"], 20, 1_700_000_000_000)
        out = ch.process(none).batch
        assert out.raw == none.raw
        assert ch.describe()[0]["batches"] == 0  # the guest was not called at all
        every = readings(reg, ["a"], 20, 1_700_000_000_000)
        out = ch.process(every).batch
        assert list(out.rows()) == expected(every, reg, ["a"], None)
        assert ch.describe()[0]["batches"] == 1


def test_split_kernel_keeps_order_and_selects_nothing_past_its_table():
    check = OutputCheck()
    recs = [(1_700_000_000_000 + i, float(i), i % 7, i) for i in range(50)]
    raw = b"".join(RECORD.pack(*r) for r in recs)
    table = bytes([0, 1, 0, 1, 1])  # ids 5 and 6 are past the table: not selected
    hit, rest = check.split(raw, table)
    want_hit = [r for r in recs if r[2] < 5 and table[r[2]]]
    want_rest = [r for r in recs if not (r[2] < 5 and table[r[2]])]
    assert list(RECORD.iter_unpack(hit)) == want_hit
    assert list(RECORD.iter_unpack(rest)) == want_rest
    assert check.split(raw, bytes([1] * 7)) == (raw, b"")
    assert check.split(raw, b"") == (b"", raw)
    assert check.split(b"", table) == (b"", b"")
    check.close()
    check.close()  # idempotent


def test_one_check_kernel_serves_every_stage_and_split_of_a_chain(tmp_path):
    reg = SeriesRegistry()
    stages = [
        stage("valid", "validity", "filter", {"range": {"T": [-40, 60]}}),
        stage("cal", "calibrate", "map", CAL, match={"metrics": ["T"]}),
        stage("win", "window", "aggregate", {"window_s": 600, "passthrough": True}),
    ]
    with build(stages, reg, tmp_path) as ch:
        kernels = {id(slot.stage._check) for slot in ch._slots}
        assert kernels == {id(ch._check)}
        for i in range(3):
            res = ch.process(readings(reg, ["kit", "lab"], 200, 1_700_000_000_000 + i * 10**6))
            assert not res.dead_letters and len(res.batch)
        assert ch._check.instances == 1
    assert ch._check.memory_bytes() == 0  # closed with the chain


def test_an_oversized_batch_lets_the_kernel_memory_go(tmp_path):
    reg = SeriesRegistry()
    st = stage("cal", "calibrate", "map", CAL, match={"metrics": ["T"]})
    with build([st], reg, tmp_path) as ch:
        small = readings(reg, ["kit"], 10, 1_700_000_000_000)
        ch.process(small)
        assert 0 < ch._check.memory_bytes() <= KEEP_BYTES
        assert ch._check.instances == 1
        # 3 records a row, and the split of n records needs 3 x 24 x n bytes of kernel memory
        rows = KEEP_BYTES // RECORD.size // 9 + 100
        big = readings(reg, ["kit"], rows, 1_700_000_000_000)
        got = ch.process(big)
        assert list(got.batch.rows()) == expected(big, reg, None, ["T"])
        # the split grew it past KEEP_BYTES: that instance went with its memory (the
        # stage's check of its third of the batch then made a fresh, smaller one)
        assert ch._check.instances == 2
        assert 0 < ch._check.memory_bytes() <= KEEP_BYTES
        got = ch.process(small)
        assert list(got.batch.rows()) == expected(small, reg, None, ["T"])
        assert ch._check.instances == 2


_FRESH_PROCESS = """
import sys, wasmtime
from pathlib import Path
from pipeline.wasm._aot import ModuleCache
from pipeline.chain._check import OutputCheck
from pipeline.chain._engine import engine, engine_settings
cache = ModuleCache(Path(sys.argv[1]), engine(), engine_settings())
if sys.argv[2] == "cached":
    def refuse(*a, **k):
        raise AssertionError("compiled although the AOT cache holds the module")
    wasmtime.Module.__init__ = refuse
check = OutputCheck(cache)
assert check.max_series(bytes(16) + (41).to_bytes(4, "little") + bytes(4)) == 41
print(cache.hits, cache.misses)
"""


def test_the_check_module_is_loaded_from_the_aot_cache(tmp_path):
    """A process that finds its stages in the AOT cache never runs Cranelift for the
    check module either (compiling it cost ~6 MB of resident memory for good)."""

    def fresh(mode: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", _FRESH_PROCESS, str(tmp_path), mode],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert fresh("first") == ["0", "1"]
    assert len(list(tmp_path.glob("*.cwasm"))) == 1
    assert fresh("cached") == ["1", "0"]


# -- the kernel against plain Python references, on seeded random batches -------------

_LO, _HI = 946_684_800_000, 4_102_444_799_999


def _recs(raw: bytes) -> list[tuple[int, float, int, int]]:
    return list(RECORD.iter_unpack(raw))


def _ref_bad(out: bytes, inp: bytes) -> int:
    ins = _recs(inp)
    lo = min([_LO, *(r[0] for r in ins)])
    hi = max([_HI, *(r[0] for r in ins)])
    clean = all(abs(r[1]) <= 1e250 for r in ins)  # False for NaN, like f64.le
    for i, (ts, v, _, _) in enumerate(_recs(out)):
        if not lo <= ts <= hi or (clean and not abs(v) <= 1e250):
            return i
    return -1


def _ref_map(out: bytes, inp: bytes) -> int:
    if len(out) != len(inp):
        return -2
    if any((a[0], a[2]) != (b[0], b[2]) for a, b in zip(_recs(out), _recs(inp), strict=True)):
        return -2
    return -1 if out == inp else _ref_bad(out, inp)


def _ref_new(out: bytes, inp: bytes, known: int) -> int:
    if out and max(r[2] for r in _recs(out)) >= known:
        return -2
    return _ref_bad(out, inp) if out else -1


def test_kernel_agrees_with_python_references_on_random_batches():
    import math
    import random

    rng = random.Random(14)
    check = OutputCheck()
    specials = [math.nan, math.inf, -math.inf, 1e251, -1e300, 1e250, 0.0, -0.0]
    for case in range(400):
        n = rng.choice([0, 1, 2, 5, 17, 100, 1000])
        sids = rng.randint(1, 40)
        recs = []
        for _ in range(n):
            ts = _LO + rng.randint(0, 10**12)
            if case % 2:  # half the cases give the stage timestamps out of range
                ts = rng.choice([ts, _LO - 1, _HI + 1, 0, -(2**63)])
            v = rng.choice(specials) if rng.random() < 0.02 else rng.uniform(-1e3, 1e3)
            recs.append((ts, v, rng.randrange(sids), rng.randrange(16)))
        raw = b"".join(RECORD.pack(*r) for r in recs)
        # split: a table that may be shorter than the ids in use
        table = bytes(rng.randrange(2) for _ in range(rng.randint(0, sids + 2)))
        hit = [r for r in recs if r[2] < len(table) and table[r[2]]]
        rest = [r for r in recs if not (r[2] < len(table) and table[r[2]])]
        # (as bytes: a NaN value is not equal to itself)
        want = tuple(b"".join(RECORD.pack(*r) for r in part) for part in (hit, rest))
        assert check.split(raw, table) == want, case
        # a map's output: values changed, sometimes a key or a value out of range
        out = [list(r) for r in recs]
        for r in out:
            if rng.random() < 0.3:
                r[1] = rng.choice(specials) if rng.random() < 0.05 else r[1] * 1.5
        if out and rng.random() < 0.2:
            rng.choice(out)[rng.choice([0, 2])] += 1
        if out and rng.random() < 0.1:
            rng.choice(out)[0] = rng.choice([_LO - 1, _LO, _HI, _HI + 1, -(2**63), 2**63 - 1])
        mapped = b"".join(RECORD.pack(*r) for r in out)
        assert check.map_output(mapped, raw) == _ref_map(mapped, raw), case
        if out and rng.random() < 0.2:
            mapped = mapped[: -RECORD.size]
            assert check.map_output(mapped, raw) == -2, case
        # a new record's series ids against the registry's size
        known = rng.randint(0, sids + 1)
        assert check.new_output(mapped, raw, known) == _ref_new(mapped, raw, known), case
        # an aggregate's output with one timestamp moved to the edges of 2000..2100
        if recs:
            i = rng.randrange(n)
            for ts in (_LO - 1, _LO, _HI, _HI + 1):
                moved = list(recs)
                moved[i] = (ts, *recs[i][1:])
                made = b"".join(RECORD.pack(*r) for r in moved)
                assert check.new_output(made, raw, sids) == _ref_new(made, raw, sids), case
        # a filter's output: a subsequence, or not after a change
        keep = [r for r in recs if rng.random() < 0.7]
        kept = b"".join(RECORD.pack(*r) for r in keep)
        assert check.is_subsequence(kept, raw), case
        if keep:
            i = rng.randrange(len(keep))
            keep[i] = (keep[i][0], keep[i][1], keep[i][2], keep[i][3] ^ 1 << 7)
            changed = b"".join(RECORD.pack(*r) for r in keep)
            assert not check.is_subsequence(changed, raw), case
    check.close()
