"""Rollouts end to end: a real receiver (``edgepipe-cloud serve`` with the fleet's signing key,
evaluating rollouts every half second), four real ``edgepipe run`` processes each with its
own mosquitto and MQTT load, rollouts started, watched and refused through the real CLI
(docs/rollout.md).  The soak time is a short real one here (the receiver runs in its own
process); tests/test_rollout_engine.py moves an injected clock instead."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools._dataset import FULL, METRICS, read_rows
from devtools._mosquitto import Mosquitto
from storage import generate_key_line
from tests.helpers.edge import EdgeProcess, publish, reading_msg, wait_for
from tests.helpers.fleet import Fleet, edge_config, validity, write_filters
from tests.helpers.wasm import wat_module

NAMES = ["dev-a", "dev-b", "dev-c", "dev-d"]

#: Traps (``unreachable``) on a negative value: the UCI set marks a missing one as -200.
TRAP_ON_NEGATIVE = wat_module(
    "(local $i i32)"
    "(block $done (loop $l"
    " (br_if $done (i32.ge_u (local.get $i) (local.get 0)))"
    " (if (f64.lt (f64.load (i32.add (i32.const 1032) (i32.mul (local.get $i) (i32.const 24))))"
    "  (f64.const 0)) (then unreachable))"
    " (local.set $i (i32.add (local.get $i) (i32.const 1))) (br $l)))"
    "(i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.extend_i32_u (local.get 0)))"
)


class Device:
    def __init__(self, name: str, tmp: Path, fleet: Fleet, start: Any) -> None:
        self.name, self.tmp = name, tmp
        self.broker = Mosquitto().__enter__()
        self.keyfile = tmp / "store.key"
        tmp.mkdir(parents=True, exist_ok=True)
        self.keyfile.write_text(generate_key_line() + "\n")
        self.keyfile.chmod(0o600)
        (tmp / "edge").mkdir()
        local = write_filters(tmp / "local", [validity(-1e9, 1e9)])
        self.config = edge_config(tmp / "edge", self.broker, self.keyfile, fleet, name, local)
        self._start = start
        self.proc: EdgeProcess | None = None
        self.published = 0

    def run(self) -> None:
        self.proc = self._start(self.config)
        self.proc.wait_subscribed()

    def stop(self) -> None:
        assert self.proc is not None
        assert self.proc.terminate() == 0
        self.proc = None

    def send(self, values: list[float]) -> None:
        base = self.published
        publish(
            self.broker,
            [reading_msg("s1", "pm25", base + i, v) for i, v in enumerate(values)],
        )
        self.published += len(values)

    def close(self) -> None:
        self.broker.__exit__(None, None, None)


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    monkeypatch.setenv("EDGEPIPE_CLOUD_ROLLOUT_EVALUATE_S", "0.5")
    f = Fleet(tmp_path / "cloud")
    for name in NAMES:
        f.add_device(name)
        r = f.cli(
            "devices", "label", name, "site=lab", f"ring={'canary' if name == NAMES[0] else 'ga'}"
        )
        assert r.returncode == 0, r.stderr
    with f.receiver:
        yield f


@pytest.fixture
def devices(tmp_path: Path, fleet: Fleet, edge: Any) -> Iterator[dict[str, Device]]:
    with ExitStack() as stack:
        out = {}
        for name in NAMES:
            d = Device(name, tmp_path / name, fleet, edge)
            stack.callback(d.close)
            out[name] = d
        for d in out.values():
            d.run()
        yield out


def _status(fleet: Fleet, rid: int) -> dict[str, Any]:
    r = fleet.cli("rollout", "status", str(rid), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _wait_rollout(fleet: Fleet, rid: int, state: str, timeout: float = 120) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        with fleet.backend() as b:
            ro = b.rollout(rid)
        if ro["state"] not in ("running", "paused", "halted", state):
            raise AssertionError(f"rollout ended {ro['state']}: {ro['reason']}")
        return ro if ro["state"] == state else None

    try:
        return wait_for(reached, timeout, f"rollout {rid} {state}")  # type: ignore[return-value]
    except AssertionError:
        with fleet.backend() as b:
            ro = b.rollout(rid)
            detail = {d["device"]: b.bundle_state(d["device"]) for d in ro["devices"]}
        raise AssertionError(f"rollout {rid} not {state}: {ro}; devices: {detail}") from None


def _base(fleet: Fleet, tmp: Path, devices: dict[str, Device]) -> int:
    """Every device on a first bundle (what a rollout rolls back to)."""
    v = fleet.bundle(write_filters(tmp / "base", [validity(-1e9, 1e9)], tag="base"))
    for name in devices:
        fleet.desire(name, v)
    for name in devices:
        wait_for(lambda n=name: fleet.state(n)["active_version"] == v, 60, f"{name} on base")
    return v


def _per_device(fleet: Fleet) -> dict[str, tuple[int, int]]:
    """(readings, distinct (seq, value)) per device in the receiver."""
    con = sqlite3.connect(f"file:{fleet.receiver.db_path}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute(
            "SELECT d.name, count(*), count(DISTINCT r.val) FROM readings r "
            "JOIN series s ON s.id = r.series_id JOIN devices d ON d.id = s.device_id "
            "GROUP BY d.name"
        ).fetchall()
    finally:
        con.close()
    return {n: (c, u) for n, c, u in rows}


def test_a_good_bundle_reaches_every_device_in_canary_and_two_waves_losing_nothing(
    tmp_path: Path, fleet: Fleet, devices: dict[str, Device]
) -> None:
    _base(fleet, tmp_path, devices)
    good = fleet.bundle(write_filters(tmp_path / "good", [validity(-1e9, 2e9)], tag="good"))
    offline = devices["dev-d"]  # in the last wave; away while the rollout starts
    offline.stop()
    stop = threading.Event()
    online = [d for d in devices.values() if d is not offline]

    def load() -> None:  # MQTT load on every online device all through the swaps
        while not stop.is_set():
            for d in online:
                d.send([float(d.published + i) for i in range(50)])

    loader = threading.Thread(target=load)
    loader.start()
    try:
        r = fleet.cli(
            "rollout", "start", str(good), "--group", "site=lab", "--canary", "1",
            "--wave", "50%", "--soak", "2s",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        rid = json.loads(r.stdout)["rollout"]
        assert json.loads(r.stdout)["waves"] == [["dev-a"], ["dev-b", "dev-c"], ["dev-d"]]
        # overlapping groups are refused while it runs
        r2 = fleet.cli("rollout", "start", str(good), "--group", "ring=canary")
        assert r2.returncode == 1 and f"rollout {rid} is still active" in r2.stderr
        wait_for(lambda: _status(fleet, rid)["current_wave"] == 2, 120, "the last wave started")
        st = _status(fleet, rid)
        states = {d["device"]: d["state"] for d in st["devices"]}
        assert states == {"dev-a": "healthy", "dev-b": "healthy", "dev-c": "healthy",
                          "dev-d": "downloading"}  # fmt: skip
        offline.run()  # back: it applies the final bundle, and the rollout finishes
        ro = _wait_rollout(fleet, rid, "done")
    finally:
        stop.set()
        loader.join()
    offline.send([float(i) for i in range(100)])
    assert {d["device"]: d["state"] for d in ro["devices"]} == dict.fromkeys(NAMES, "healthy")
    for name, d in devices.items():
        st = fleet.state(name)
        assert st["active_version"] == good and st["in_sync"], name
        assert d.proc is not None
        d.proc.wait_metric("edgepipe_messages_acked_total", d.published, 60)
    # nothing lost, nothing twice, across the swaps: per device, the receiver has each
    # published reading exactly once
    want = {n: (d.published, d.published) for n, d in devices.items()}
    wait_for(lambda: _per_device(fleet) == want, 90, f"all synced: {want}")
    # the CLI's timeline
    r = fleet.cli("rollout", "status", str(rid))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert f"rollout {rid}: bundle {good} to site=lab -- done" in text
    for kind in ("started", "wave", "applied", "healthy", "done"):
        assert f" {kind}" in text
    assert "canary:" in text and "wave 2:" in text
    (tmp_path / "timeline-good.txt").write_text(text)


def _uci(metric: str, n: int) -> list[float]:
    col = METRICS.index(metric)
    out = []
    for _ts, values in read_rows(FULL):
        out.append(values[col])
        if len(out) == n:
            break
    return out


def test_a_bundle_that_traps_on_real_data_halts_at_the_canary_and_rolls_back(
    tmp_path: Path, fleet: Fleet, devices: dict[str, Device]
) -> None:
    base = _base(fleet, tmp_path, devices)
    data = _uci("NMHC_GT", 300)
    assert min(data) == -200.0  # the data set's missing value: what the filter trips on
    trap_dir = tmp_path / "trap"
    (trap_dir / "lib").mkdir(parents=True)
    import wasmtime

    (trap_dir / "lib" / "guard.wasm").write_bytes(wasmtime.wat2wasm(TRAP_ON_NEGATIVE))
    (trap_dir / "filters.yaml").write_text(
        yaml.safe_dump({"version": 1, "chain": [{"name": "guard", "module": "lib/guard.wasm"}]})
    )
    bad = fleet.bundle(trap_dir / "filters.yaml")
    r = fleet.cli("rollout", "start", str(bad), "--group", "site=lab", "--soak", "30m")
    assert r.returncode == 0, r.stderr
    rid = json.loads(r.stdout)["rollout"]
    canary = devices["dev-a"]
    wait_for(lambda: fleet.state("dev-a")["active_version"] == bad, 60, "canary applied")
    assert canary.proc is not None  # installed, and swapped in (the base was the first swap)
    canary.proc.wait_metric("edgepipe_chain_reloads_total", 2, 60, result="ok")
    for d in devices.values():
        d.send(data)
    ro = _wait_rollout(fleet, rid, "rolled_back")
    assert "gate failed on dev-a: trap in stage guard" in ro["reason"]
    by = {d["device"]: d for d in ro["devices"]}
    assert by["dev-a"]["state"] == "rolled_back"
    assert all(by[n]["state"] == "skipped" for n in NAMES[1:])
    rb = by["dev-a"]["rollback_version"]
    assert rb > bad
    st = fleet.state("dev-a")
    assert st["active_version"] == rb and st["previous_version"] == bad
    # the rollback bundle carries the base chain, re-signed: the canary filters as before
    with fleet.backend() as b:
        assert b.get_bundle(rb)["filters_sha256"] == b.get_bundle(base)["filters_sha256"]
    for name in NAMES[1:]:  # the others never got it
        assert fleet.state(name)["active_version"] == base
        assert all(e["version"] != bad for e in fleet.events(name)), name
    assert canary.proc is not None
    canary.send([1.0, 2.0])
    canary.proc.wait_metric("edgepipe_messages_acked_total", canary.published, 60)
    r = fleet.cli("rollout", "status", str(rid))
    assert "rollback_bundle" in r.stdout and "rolled_back" in r.stdout
    (tmp_path / "timeline-trap.txt").write_text(r.stdout)


def test_rollouts_the_cli_refuses(tmp_path: Path, fleet: Fleet) -> None:
    v = fleet.bundle(write_filters(tmp_path / "v", [validity(0, 10)], tag="refuse"))
    r = fleet.cli("rollout", "start", str(v), "--group", "site=nowhere")
    assert r.returncode == 1 and "no device has label site=nowhere" in r.stderr
    r = fleet.cli("rollout", "start", "999", "--group", "site=lab")
    assert r.returncode == 1 and "no bundle version 999" in r.stderr
    stranger, _ = fleet.new_key("stranger.key")
    r = fleet.cli("rollout", "start", str(v), "--group", "site=lab", key=stranger)
    assert r.returncode == 1 and "not signed by a signing key of this fleet" in r.stderr
    fleet.sql("UPDATE bundles SET signature = ? WHERE version = ?", "00" * 64, v)
    r = fleet.cli("rollout", "start", str(v), "--group", "site=lab")
    assert r.returncode == 1 and "bad_signature" in r.stderr
    r = fleet.cli("rollout", "start", str(v), "--group", "site lab")
    assert r.returncode == 1 and "--group" in r.stderr
    r = fleet.cli("rollout", "start", str(v), "--group", "site=lab", "--soak", "soon")
    assert r.returncode == 1 and "duration" in r.stderr
    r = fleet.cli("devices", "label", "dev-a", "bad key=x")
    assert r.returncode == 1 and "label" in r.stderr
    # labels at `devices add`; a bad one adds nothing
    r = fleet.cli("devices", "add", "dev-x", "--label", "site=lab", "--label", "ring=<b>")
    assert r.returncode == 1 and "the value must be" in r.stderr
    r = fleet.cli("devices", "add", "dev-x", "--label", "site=lab", "--label", "ring=late")
    assert r.returncode == 0, r.stderr
    listed = [json.loads(line) for line in fleet.cli("devices", "list").stdout.splitlines()]
    assert {d["name"]: d["labels"] for d in listed}["dev-x"] == {"ring": "late", "site": "lab"}
    assert {d["name"]: d["labels"] for d in listed}["dev-a"] == {"ring": "canary", "site": "lab"}
    with fleet.backend() as b:
        assert b.list_rollouts() == []
