"""Durable filter state: snapshot -> a new chain (as after a restart) -> restore
continues exactly like an uninterrupted run; hot-swap hand-over; AOT cache."""

from __future__ import annotations

from core._metrics import METRICS
from core._model import Batch, SeriesRegistry
from pipeline.chain._chain import Chain
from pipeline.chain._engine import engine, engine_settings
from pipeline.wasm._aot import ModuleCache
from tests.helpers.wasm import LIB, REPO, airquality, batches, stage

STAGES = [
    stage("valid", "validity", "filter", {"range": {"CO_GT": [0, 50]}}),
    stage("dedup", "dedup", "filter"),
    stage("ema", "ema", "map", {"alpha": 0.25}),
    stage("z", "zscore", "map", {"alpha": 0.1, "threshold": 2.5, "warmup": 5}),
    stage("win", "window", "aggregate", {"window_s": 4 * 3600, "passthrough": True}),
    stage("db", "deadband", "filter", {"band": 0.5}),
]


def run(chain: Chain, parts: list[Batch]) -> list[tuple]:
    out: list[tuple] = []
    for b in parts:
        res = chain.process(b)
        assert not res.dead_letters
        out += list(res.batch.rows())
    return out


def test_restart_from_snapshot_continues_exactly(tmp_path):
    reg = SeriesRegistry()
    data = airquality(reg).take(range(13 * 2000))
    parts = batches(data, 500)
    cut = len(parts) // 2
    kw = {"base_dir": REPO, "cache_dir": tmp_path / "aot"}

    with Chain.build(STAGES, reg, **kw) as ref:
        want = run(ref, parts) + list(ref.flush().batch.rows())

    # first run: process half, persist the snapshot (as the store would), "crash"
    reg1 = SeriesRegistry(reg.key(i) for i in range(13))  # the store's persisted series
    with Chain.build(STAGES, reg1, **kw) as first:
        got = run(first, parts[:cut])
        saved = {k: bytes(v) for k, v in first.snapshot().items()}
        persisted = [reg1.key(i) for i in range(len(reg1))]
    assert set(saved) == {"dedup", "ema", "z", "win", "db"}
    assert all(saved.values())

    # restart: new registry from the store, new chain, restore, continue
    reg2 = SeriesRegistry(persisted)
    with Chain.build(STAGES, reg2, **kw) as second:
        second.restore(saved)
        got += run(second, parts[cut:]) + list(second.flush().batch.rows())
    assert got == want
    assert any(fl & 4 for *_, fl in got)  # aggregates were emitted across the restart


def test_snapshot_reflects_last_good_batch_only(tmp_path):
    reg = SeriesRegistry()
    sid = reg.intern("d", "T")
    with Chain.build(
        [stage("ema", "ema", "map", {"alpha": 0.5})], reg, base_dir=REPO, cache_dir=None
    ) as ch:
        ch.process(Batch([1], [10.0], [sid]))
        s1 = ch.snapshot()["ema"]
        assert ch.snapshot()["ema"] == s1  # no guest call needed, same blob
        ch.process(Batch([2], [20.0], [sid]))
        assert ch.snapshot()["ema"] != s1


def test_restore_rejects_foreign_state(tmp_path):
    reg = SeriesRegistry()
    reg.intern("d", "T")
    kw = {"base_dir": REPO, "cache_dir": None}
    with Chain.build([stage("win", "window", "aggregate")], reg, **kw) as ch:
        ch.process(Batch([1], [1.0], [0]))
        blob = ch.snapshot()["win"]
    dropped = METRICS.value("edgepipe_stage_state_dropped_total", stage="win", reason="restore")
    with Chain.build([stage("win", "ema", "map")], reg, **kw) as other:  # same name, other module
        other.restore({"win": blob})  # refused: dropped, counted, the stage starts cold
        d = other.describe()[0]
        assert d["state_dropped"] == 1 and d["last_code"] == "restore"
        assert d["consecutive_failures"] == 1 and d["state_bytes"] == 0
        assert other.process(Batch([2], [4.0], [0])).batch.value == [4.0]  # cold EMA
        other.restore({"gone": b"xx"})  # stages no longer in the chain are ignored
    assert (
        METRICS.value("edgepipe_stage_state_dropped_total", stage="win", reason="restore")
        == dropped + 1
    )


def test_hand_over_flushes_and_moves_state(tmp_path):
    reg = SeriesRegistry()
    sid = reg.intern("d", "T")
    kw = {"base_dir": REPO, "cache_dir": None}
    old = Chain.build(
        [stage("ema", "ema", "map", {"alpha": 0.5}), stage("win", "window", "aggregate")], reg, **kw
    )
    old.process(Batch([1000, 2000], [10.0, 20.0], [sid, sid]))
    new = Chain.build([stage("ema", "ema", "map", {"alpha": 0.5})], reg, **kw)
    flushed = old.hand_over(new)
    assert sorted(reg.key(s).metric for s in flushed.batch.series) == [
        "T_count",
        "T_max",
        "T_mean",
        "T_min",
    ]
    # the EMA continues: 10, 15 -> next 30 gives 22.5
    assert new.process(Batch([3000], [30.0], [sid])).batch.value == [22.5]
    new.close()
    new.close()  # idempotent


# -- AOT cache ------------------------------------------------------------------------


def test_aot_cache_hit_corrupt_and_stale(tmp_path):
    wasm = (LIB / "ema.wasm").read_bytes()
    import hashlib

    digest = hashlib.sha256(wasm).hexdigest()
    cache = ModuleCache(tmp_path, engine(), engine_settings())
    cache.load(wasm, digest)
    assert (cache.hits, cache.misses) == (0, 1)
    [entry] = list(tmp_path.glob("*.cwasm"))
    cache.load(wasm, digest)
    assert cache.hits == 1

    good = entry.read_bytes()
    for bad in (good[:100], good[:-1] + bytes([good[-1] ^ 1]), b"EPAOT" + good[5:], b""):
        entry.write_bytes(bad)
        cache.load(wasm, digest)
        assert entry.read_bytes() == good  # recompiled and replaced
    hits = cache.hits
    # another engine configuration never reads this entry
    other = ModuleCache(tmp_path, engine(), engine_settings() + ";other")
    other.load(wasm, digest)
    assert other.misses == 1 and cache.hits == hits
    assert len(list(tmp_path.glob("*.cwasm"))) == 2
    # an entry written under one key but renamed to another key's file is refused
    a, b = sorted(tmp_path.glob("*.cwasm"))
    a.write_bytes(b.read_bytes())
    cache.load(wasm, digest)
    other.load(wasm, digest)
    assert cache.misses + other.misses >= 3


def test_chain_uses_aot_cache(tmp_path):
    reg = SeriesRegistry()
    with Chain.build(STAGES, reg, base_dir=REPO, cache_dir=tmp_path):
        pass
    assert len(list(tmp_path.glob("*.cwasm"))) == len(STAGES)
