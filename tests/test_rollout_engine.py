"""The rollout state machine against both real backends (a SQLite file, a schema of the real
PostgreSQL), with an injected clock for the soak time.  Devices' check-ins are stored
through the backend exactly as ``POST /v1/bundle`` stores them (the end-to-end tests with
real ``edgepipe run`` processes are in tests/test_rollout_fleet.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cloud import Backend
from cloud._bundle_cli import reissue_bundle
from cloud._rollout import RolloutEngine, health_rates, parse_duration, plan_waves
from cloud._rollout_store import RolloutConflict
from core._clock import ManualClock
from protocol import _bundle
from tests.helpers.bundles import KEY, make_bundle
from tests.helpers.cloud_client import new_device


def _health(n_in: int, drops: int = 0, traps: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "validity": {
            "in": n_in,
            "out": n_in - drops,
            "drops": {"out_of_range": drops} if drops else {},
            "dead_letters": 0,
            "traps": traps or {},
            "breaker_open": 0,
        }
    }


def _report(b: Backend, name: str, clock: ManualClock, **kw: Any) -> None:
    rep = {
        "active_version": None,
        "previous_version": None,
        "applied_ms": None,
        "status": None,
        "version": None,
        "reason": None,
        "detail": None,
        "health": None,
    }
    rep.update(kw)
    b.report_bundle_state(name, rep, now=int(clock.time() * 1000))


def _runs(b: Backend, name: str, version: int, clock: ManualClock, **health: Any) -> None:
    _report(b, name, clock, active_version=version, status="applied", version=version,
            health=_health(**health) if health else _health(100))  # fmt: skip


class Group:
    def __init__(self, backend: Backend, tmp: Path, n: int, label: str) -> None:
        self.b = backend
        self.names = []
        for _ in range(n):
            name, _secret = new_device(backend)
            backend.set_labels(name, {"group": label})
            self.names.append(name)
        self.names.sort()
        self.clock = ManualClock(start=__import__("time").time())
        self.engine = RolloutEngine(backend, clock=self.clock)
        self.base = make_bundle(backend, tmp / "base", tag=f"base-{label}")["version"]
        for name in self.names:  # every device runs the base bundle, dropping 1 %
            backend.set_desired(name, self.base, "test", now=self.now)
            _runs(backend, name, self.base, self.clock, n_in=1000, drops=10)

    @property
    def now(self) -> int:
        return int(self.clock.time() * 1000)

    def start(self, version: int, label: str, *, rollback: bool = True, **spec: Any) -> int:
        """What ``rollout start`` stores: the plan, and a rollback bundle of the base chain
        signed as a version above ``version``."""
        full = {"canary": "1", "wave": "50%", "soak_ms": 60_000, "policy": "device"}
        if rollback:
            made = reissue_bundle(
                self.b, KEY, self.base, fleet="default", priority="urgent", valid_days=1
            )
            full["rollbacks"] = {str(self.base): made["version"]}
        full |= {"max_drop_increase": 0.05, "max_dead_letter_increase": 0.01, "min_readings": 0}
        full |= spec
        waves = plan_waves(self.names, full["canary"], full["wave"])
        rid = self.b.create_rollout(version, ("group", label), full, waves, now=self.now)
        self.engine.evaluate()
        return rid

    def states(self, rid: int) -> dict[str, str]:
        return {d["device"]: d["state"] for d in self.b.rollout(rid)["devices"]}


def test_waves_plans_and_durations() -> None:
    names = [f"d{i}" for i in range(10)]
    assert [len(w) for w in plan_waves(names, "1", "50%")] == [1, 5, 4]
    assert [len(w) for w in plan_waves(names, "10%", "3")] == [1, 3, 3, 3]
    assert plan_waves(names[:1], "5", "25%") == [["d0"]]
    with pytest.raises(ValueError, match="--canary"):
        plan_waves(names, "0", "50%")
    with pytest.raises(ValueError, match="--wave"):
        plan_waves(names, "1", "150%")
    assert parse_duration("30m") == 1_800_000 and parse_duration("90") == 90_000
    with pytest.raises(ValueError):
        parse_duration("soon")
    r = health_rates(_health(200, drops=20, traps={"unreachable": 2}))
    assert r["in"] == 200 and r["drop_rate"] == 0.1 and r["traps"] == {"validity": ["unreachable"]}


def test_a_good_bundle_goes_canary_then_waves_after_each_soak(
    backend: Backend, tmp_path: Path
) -> None:
    g = Group(backend, tmp_path, 4, "good")
    v = make_bundle(backend, tmp_path / "v", tag="good-v")["version"]
    rid = g.start(v, "good")
    canary, rest = g.names[0], g.names[1:]
    assert g.states(rid) == {canary: "downloading", **{n: "pending" for n in rest}}
    assert backend.bundle_state(canary)["desired_version"] == v
    assert all(backend.bundle_state(n)["desired_version"] == g.base for n in rest)
    _runs(backend, canary, v, g.clock, n_in=500, drops=5)
    g.engine.evaluate({canary})
    assert g.states(rid)[canary] == "applied"
    g.clock.advance(59)
    g.engine.evaluate()
    assert g.states(rid)[canary] == "applied"  # soaking
    g.clock.advance(2)
    # a restarted receiver carries on from the database
    g.engine = RolloutEngine(backend, clock=g.clock)
    g.engine.evaluate()
    st = g.states(rid)
    assert st[canary] == "healthy" and [st[n] for n in rest] == [
        "downloading",
        "downloading",
        "pending",
    ]
    for n in rest[:2]:
        _runs(backend, n, v, g.clock, n_in=300)
    g.engine.evaluate()
    g.clock.advance(61)
    g.engine.evaluate()
    assert g.states(rid)[rest[2]] == "downloading"
    _runs(backend, rest[2], v, g.clock, n_in=10)
    g.engine.evaluate()
    g.clock.advance(61)
    g.engine.evaluate()
    ro = backend.rollout(rid)
    assert ro["state"] == "done" and set(g.states(rid).values()) == {"healthy"}
    kinds = [e["kind"] for e in backend.rollout_events(rid)]
    assert kinds[0] == "started" and kinds.count("wave") == 3 and kinds[-1] == "done"
    assert all(d["previous_version"] == g.base for d in ro["devices"])
    assert ro["devices"][0]["baseline"]["drop_rate"] == pytest.approx(0.01)


def test_a_trap_halts_at_the_canary_and_rolls_it_back_with_a_resigned_bundle(
    backend: Backend, tmp_path: Path
) -> None:
    g = Group(backend, tmp_path, 3, "trap")
    v = make_bundle(backend, tmp_path / "v", tag="trap-v")["version"]
    rid = g.start(v, "trap")
    canary = g.names[0]
    _runs(backend, canary, v, g.clock, n_in=50, traps={"unreachable": 3})
    g.engine.evaluate({canary})
    ro = backend.rollout(rid)
    assert ro["state"] == "halted" and "trap in stage validity" in ro["reason"]
    d = ro["devices"][0]
    assert d["state"] == "rolling_back" and d["rollback_version"] > v
    rb = backend.get_bundle(d["rollback_version"])
    m = _bundle.verify(
        rb["manifest"], rb["signature"], rb["key_id"], trusted={KEY.id: KEY.public},
        now_ms=g.now, applied_version=v,
    )  # fmt: skip
    base = json.loads(backend.get_bundle(g.base)["manifest"])
    assert m.filters_text == base["filters"]["text"] and m.priority == "urgent"
    assert [x.sha256 for x in m.modules] == [x["sha256"] for x in base["modules"]]
    assert backend.bundle_state(canary)["desired_version"] == rb["version"]
    assert [backend.bundle_state(n)["desired_version"] for n in g.names[1:]] == [g.base] * 2
    _runs(backend, canary, rb["version"], g.clock)
    g.engine.evaluate()
    ro = backend.rollout(rid)
    assert ro["state"] == "rolled_back"
    assert g.states(rid) == {canary: "rolled_back", **{n: "skipped" for n in g.names[1:]}}
    events = backend.rollout_events(rid)
    assert [e["kind"] for e in events if e["device"] == canary][-1] == "rolled_back"


def test_a_drop_rate_above_the_margin_fails_the_gate_and_policy_all_rolls_back_every_device(
    backend: Backend, tmp_path: Path
) -> None:
    g = Group(backend, tmp_path, 3, "drops")
    v = make_bundle(backend, tmp_path / "v", tag="drops-v")["version"]
    rid = g.start(v, "drops", canary="2", wave="1", policy="all")
    a, b_, c = g.names
    _runs(backend, a, v, g.clock, n_in=1000, drops=50)  # 5 %: within 1 % + 5 %
    _runs(backend, b_, v, g.clock, n_in=1000, drops=70)  # 7 %: beyond
    g.engine.evaluate()
    ro = backend.rollout(rid)
    assert ro["state"] == "halted" and "drop rate 7.0%" in ro["reason"] and b_ in ro["reason"]
    st = g.states(rid)
    assert st == {a: "rolling_back", b_: "rolling_back", c: "skipped"}
    rbs = {d["rollback_version"] for d in ro["devices"] if d["rollback_version"]}
    assert len(rbs) == 1  # one rollback bundle per previous chain


def test_a_refused_bundle_fails_the_gate_and_the_device_keeps_its_chain(
    backend: Backend, tmp_path: Path
) -> None:
    g = Group(backend, tmp_path, 3, "refuse")
    v = make_bundle(backend, tmp_path / "v", tag="refuse-v")["version"]
    rid = g.start(v, "refuse", canary="2")
    _report(backend, g.names[0], g.clock, active_version=g.base, status="failed", version=v,
            reason="invalid_chain", detail="filters.yaml: stage validity: unknown key")  # fmt: skip
    g.engine.evaluate()
    ro = backend.rollout(rid)
    assert ro["state"] == "rolled_back" and "invalid_chain" in ro["reason"]
    assert [d["state"] for d in ro["devices"]] == ["failed", "skipped", "skipped"]
    # the other canary had not applied it yet: it does not get it any more
    assert "halted before it applied" in ro["devices"][1]["reason"]
    assert [backend.bundle_state(n)["desired_version"] for n in g.names] == [g.base] * 3


def test_overlapping_rollouts_are_refused_and_pause_resume_abort(
    backend: Backend, tmp_path: Path
) -> None:
    g = Group(backend, tmp_path, 3, "ovl")
    backend.set_labels(g.names[2], {"ring": "x"})
    v = make_bundle(backend, tmp_path / "v", tag="ovl-v")["version"]
    rid = g.start(v, "ovl")
    with pytest.raises(RolloutConflict, match=f"rollout {rid} is still active on 1"):
        backend.create_rollout(v, ("ring", "x"), {}, [[g.names[2]]], now=g.now)
    g.engine.act(rid, "pause", "test")
    _runs(backend, g.names[0], v, g.clock)
    g.engine.evaluate()
    g.clock.advance(61)
    g.engine.evaluate()
    assert g.states(rid)[g.names[0]] == "healthy"
    assert g.states(rid)[g.names[1]] == "pending"  # paused: no next wave
    with pytest.raises(ValueError, match="not running"):
        g.engine.act(rid, "pause", "test")
    g.engine.act(rid, "resume", "test")
    assert g.states(rid)[g.names[1]] == "downloading"
    ro = g.engine.act(rid, "abort", "test")
    assert ro["state"] == "aborted"
    assert {d["device"]: d["state"] for d in ro["devices"]}[g.names[2]] == "skipped"
    assert backend.bundle_state(g.names[1])["desired_version"] == g.base
    # finished: the devices are free for another rollout
    other = backend.create_rollout(v, ("ring", "x"), {}, [[g.names[2]]], now=g.now)
    assert other > rid
    kinds = [e["kind"] for e in backend.rollout_events(rid)]
    assert {"pause", "resume", "abort"} <= set(kinds)


def test_without_a_rollback_bundle_the_failure_says_how_to_roll_back_by_hand(
    backend: Backend, tmp_path: Path
) -> None:
    g = Group(backend, tmp_path, 2, "norb")
    v = make_bundle(backend, tmp_path / "v", tag="norb-v")["version"]
    rid = g.start(v, "norb", rollback=False)
    _runs(backend, g.names[0], v, g.clock, n_in=10, traps={"unreachable": 1})
    g.engine.evaluate()
    ro = backend.rollout(rid)
    assert ro["state"] == "rolled_back" and ro["devices"][0]["state"] == "failed"
    assert f"bundle create --from {g.base}" in ro["devices"][0]["reason"]
    assert "rollback_impossible" in [e["kind"] for e in backend.rollout_events(rid)]


def test_a_device_that_ran_its_local_chain_is_rolled_back_with_a_local_bundle(
    backend: Backend, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from cloud._rollout_cli import _sign_rollbacks

    g = Group(backend, tmp_path, 3, "local")
    fresh = g.names[0]  # the canary: it never applied a bundle (its ConfigMap chain runs)
    _report(backend, fresh, g.clock, health=_health(1000, drops=10))
    v = make_bundle(backend, tmp_path / "v", tag="local-v")["version"]
    rid = backend.create_rollout(v, ("group", "local"), {}, [[fresh], g.names[1:]], now=g.now)
    rollbacks = _sign_rollbacks(backend, SimpleNamespace(fleet="default"), KEY, rid, g.names)
    # one re-issue of the base chain the others run, one local bundle for the fresh device
    assert set(rollbacks) == {"local", str(g.base)} and min(rollbacks.values()) > v
    spec = {"canary": "1", "wave": "50%", "soak_ms": 60_000, "policy": "device",
            "max_drop_increase": 0.05, "max_dead_letter_increase": 0.01, "min_readings": 0,
            "rollbacks": rollbacks}  # fmt: skip
    backend.update_rollout(rid, now=g.now, spec=spec)
    g.engine.evaluate()
    assert g.states(rid)[fresh] == "downloading"
    _runs(backend, fresh, v, g.clock, n_in=50, traps={"unreachable": 3})
    g.engine.evaluate({fresh})
    ro = backend.rollout(rid)
    d = {x["device"]: x for x in ro["devices"]}[fresh]
    assert ro["state"] == "halted" and d["previous_version"] is None
    assert d["state"] == "rolling_back" and d["rollback_version"] == rollbacks["local"]
    rb = backend.get_bundle(rollbacks["local"])
    m = _bundle.verify(
        rb["manifest"], rb["signature"], rb["key_id"], trusted={KEY.id: KEY.public},
        now_ms=g.now, applied_version=v, fleet="default",
    )  # fmt: skip
    assert m.is_local and m.priority == "urgent" and not m.modules
    assert backend.bundle_state(fresh)["desired_version"] == rb["version"]
    g.clock.advance(5)
    g.engine.evaluate()  # not there yet: still rolling back
    assert g.states(rid)[fresh] == "rolling_back"
    _report(backend, fresh, g.clock, active_version=rb["version"], chain="local",
            status="applied", version=rb["version"], previous_version=v)  # fmt: skip
    g.engine.evaluate()
    ro = backend.rollout(rid)
    assert ro["state"] == "rolled_back"
    assert g.states(rid) == {fresh: "rolled_back", **{n: "skipped" for n in g.names[1:]}}
    events = [e for e in backend.rollout_events(rid) if e["device"] == fresh]
    assert "its local chain" in events[-1]["detail"] and events[-1]["kind"] == "rolled_back"
    assert "rollback_impossible" not in [e["kind"] for e in backend.rollout_events(rid)]


def test_a_local_chain_device_without_a_local_bundle_says_how_to_make_one(
    backend: Backend, tmp_path: Path
) -> None:
    g = Group(backend, tmp_path, 2, "nolocal")
    fresh = g.names[0]
    _report(backend, fresh, g.clock)
    v = make_bundle(backend, tmp_path / "v", tag="nolocal-v")["version"]
    rid = g.start(v, "nolocal")  # signs the base chain's rollback only
    _runs(backend, fresh, v, g.clock, n_in=10, traps={"unreachable": 1})
    g.engine.evaluate()
    d = backend.rollout(rid)["devices"][0]
    assert d["device"] == fresh and d["state"] == "failed"
    assert "bundle create --local" in d["reason"]
    assert "rollback_impossible" in [e["kind"] for e in backend.rollout_events(rid)]
