"""Hostile modules in a real ``edgepipe run`` (private mosquitto, QoS 1) next to a healthy
stage: every healthy reading is stored, the hostile stage's readings are stored or
dead-lettered, the process never exits, and a restart after kill -9 (which restores the
stored state into the hostile stage) does not crash-loop."""

from __future__ import annotations

import pytest

from core._model import Batch
from tests.helpers import hostile
from tests.helpers.edge import make_config, publish, reading_msg
from tests.helpers.mqtt import drain
from tests.helpers.store import dead_letters, stored
from tests.helpers.wasm import LIB, write_wat

CASES = [
    ("process_trap", "stop"),
    ("process_infinite_loop", "dead_letter"),
    ("snapshot_trap", "dead_letter"),
    ("snapshot_bad_pointer", "pass"),
    ("restore_refuses", "stop"),
    ("flush_trap", "dead_letter"),
]


def _msgs(start: int, n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(start, start + n):
        out.append(reading_msg("good", "T", i, float(i)))
        out.append(reading_msg("evil", "T", i, float(i)))
    return out


@pytest.mark.parametrize(("name", "policy"), CASES)
def test_hostile_stage_in_a_real_edge(tmp_path, broker, keyfile, edge, name, policy):
    limits = {k: v for k, v in hostile.RUNTIME[name][1].items()}
    cfg = make_config(
        tmp_path,
        broker,
        keyfile,
        chain=[
            {
                "name": "hostile",
                "module": str(hostile.write(tmp_path, name)),
                "kind": "filter_map",
                "on_error": policy,
                "match": {"devices": ["evil"]},
                "limits": limits,
            },
            {
                "name": "healthy",
                "module": str(LIB / "ema.wasm"),
                "kind": "map",
                "config": {"alpha": 1.0},
            },
        ],
    )
    db = tmp_path / "store.db"
    proc = edge(cfg)
    proc.wait_subscribed()
    publish(broker, _msgs(0, 50))
    drain(broker, proc, 10_000)
    assert proc.alive()
    proc.kill9()
    # the restart restores the stored state (restore_refuses: refused, dropped, cold)
    proc2 = edge(cfg)
    proc2.wait_subscribed()
    publish(broker, _msgs(50, 50))
    drain(broker, proc2, 10_001)
    assert proc2.alive(), proc2.output()
    assert proc2.terminate() == 0  # the shutdown flush runs the hostile ep_flush too
    rows = stored(db, keyfile)
    good = sorted(ts for dev, _, ts, _ in rows if dev == "good")
    assert good == sorted({1_700_000_000_000 + i * 1000 for i in range(100)})
    evil = {ts for dev, _, ts, _ in rows if dev == "evil"}
    for d in dead_letters(db, keyfile):
        if d.stage == "hostile":
            evil |= set(Batch.unpack(d.payload).ts)
    assert evil == {1_700_000_000_000 + i * 1000 for i in range(100)}  # none lost


def test_a_trapping_stage_says_its_code_and_backtrace_everywhere(tmp_path, broker, keyfile, edge):
    """A stage whose ep_process traps two calls deep, in a real edge: the log, the dead
    letter's reason and ``/readyz`` carry the trap code and the guest's backtrace (function
    names, module offsets); the metric labels carry the code only."""
    wat = hostile.module(extra=hostile.TWO_DEEP, process=hostile.DEEP_ENTRY["process"])
    cfg = make_config(
        tmp_path,
        broker,
        keyfile,
        chain=[
            {
                "name": "deep",
                "module": str(write_wat(tmp_path, "deep", wat)),
                "kind": "filter_map",
                "on_error": "dead_letter",
                "match": {"devices": ["evil"]},
                "limits": {"breaker_failures": 1, "breaker_cooldown_s": 3600},
            },
        ],
    )
    proc = edge(cfg)
    proc.wait_subscribed()
    publish(broker, _msgs(0, 5))
    drain(broker, proc, 10_000)
    proc.wait_metric("edgepipe_stage_breaker_open", 1, stage="deep")
    status, why = proc.readyz()  # type: ignore[misc]
    assert status == 503 and "stage deep: circuit breaker open after 1 failures" in why, why
    hostile.assert_trap_text(why, "process")
    hostile.assert_trap_text(proc.output(), "process")
    assert proc.metric("edgepipe_stage_failing", stage="deep", code="unreachable") == 1
    assert proc.metric("edgepipe_dead_letters_total", stage="deep", reason="unreachable") >= 1
    assert proc.terminate() == 0
    reasons = [d.reason for d in dead_letters(tmp_path / "store.db", keyfile) if d.stage == "deep"]
    assert reasons and all(r.startswith("stage deep: trap: unreachable: ") for r in reasons)
    hostile.assert_trap_text(reasons[0], "process")
