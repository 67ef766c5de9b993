"""Signed chain bundles end to end: a real receiver (``edgepipe-cloud serve``), bundles made
and desired with the real CLI, a real ``edgepipe run`` with its own MQTT load that pulls,
verifies, applies and reports them (docs/rollout.md)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from core._clock import now_ms
from tests.helpers.edge import EdgeProcess, publish, reading_msg, wait_for
from tests.helpers.fleet import Fleet, edge_config, validity, write_filters
from tests.helpers.store import stored_values
from tests.helpers.sync_env import Receiver

DEVICE = "test-device"  # the name tests/helpers/store.py reads the store as


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    f = Fleet(tmp_path / "cloud")
    f.add_device(DEVICE)
    with f.receiver:
        yield f


def _wait_state(fleet: Fleet, what: str, timeout: float = 60, **want: Any) -> dict[str, Any]:
    def matches() -> dict[str, Any] | None:
        st = fleet.state(DEVICE)
        return st if all(st.get(k) == v for k, v in want.items()) else None

    return wait_for(matches, timeout, what)  # type: ignore[return-value]


def _start(
    edge: Any, tmp_path: Path, broker: Any, keyfile: Path, fleet: Fleet, **kw: Any
) -> tuple[EdgeProcess, Path]:
    local = write_filters(tmp_path / "local", [validity(0, 1e9)])
    cfg = edge_config(tmp_path / "edge", broker, keyfile, fleet, DEVICE, local, **kw)
    proc = edge(cfg)
    proc.wait_subscribed()
    return proc, cfg


def _edge_dir(tmp_path: Path) -> Path:
    d = tmp_path / "edge"
    d.mkdir(exist_ok=True)
    return d


def _synced(fleet: Fleet) -> dict[str, int]:
    assert isinstance(fleet.receiver, Receiver)
    return fleet.receiver.counts()


def test_a_good_bundle_is_applied_with_no_reading_lost_or_duplicated(
    tmp_path: Path, broker: Any, keyfile: Path, edge: Any, fleet: Fleet
) -> None:
    _edge_dir(tmp_path)
    proc, _ = _start(edge, tmp_path, broker, keyfile, fleet)
    wait_for(lambda: fleet.state(DEVICE)["reported_ms"], 30, "first check-in")
    assert fleet.state(DEVICE)["active_version"] is None
    # The new chain passes everything the load publishes (values < 900000) and drops 950000+.
    v = fleet.bundle(write_filters(tmp_path / "b1", [validity(0, 900_000)], tag="good"))
    n, stop = 0, threading.Event()

    def load() -> None:  # MQTT load all through the swap
        nonlocal n
        while not stop.is_set() and n < 20_000:
            publish(broker, [reading_msg("s1", "pm25", n + i, float(n + i)) for i in range(200)])
            n += 200

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_for(lambda: n >= 600, 30, "load running")
        fleet.desire(DEVICE, v)
        st = _wait_state(fleet, "bundle applied", active_version=v, status="applied")
        proc.wait_metric("edgepipe_chain_reloads_total", 1, 30, result="ok")
        wait_for(lambda: n >= 600 + 1200, 60, "load after the swap")
    finally:
        stop.set()
        loader.join()
    assert st["previous_version"] is None and st["applied_ms"] and st["in_sync"]
    # the new chain is the one running: 950000+ dropped, the rest kept
    probe = [reading_msg("s1", "pm25", 10**6 + i, 950_000.0 + i) for i in range(5)]
    probe += [reading_msg("s1", "pm25", 2 * 10**6 + i, 800_000.0 + i) for i in range(5)]
    publish(broker, probe)
    total = n + 10
    proc.wait_metric("edgepipe_messages_acked_total", total, 60)
    values = stored_values(tmp_path / "edge" / "store.db", keyfile)
    expected = sorted([float(i) for i in range(n)] + [800_000.0 + i for i in range(5)])
    assert sorted(values) == expected  # nothing lost, nothing twice, across the swap
    wait_for(lambda: _synced(fleet)["readings"] == len(expected), 60, "all synced")
    c = _synced(fleet)
    assert c["readings"] == c["distinct"] == len(expected)

    # health since the apply is reported for the bundle's stage
    # (reported with each check-in: wait for the one after the probe's drops were counted)
    def health() -> dict[str, Any] | None:
        h = (fleet.state(DEVICE)["health"] or {}).get("validity")
        return h if h and sum(h["drops"].values()) >= 5 else None

    h = wait_for(health, 30, "stage health since the apply")  # type: ignore[assignment]
    assert h["in"] >= h["out"] + 5 and h["out"] >= 5 and h["traps"] == {}
    assert h["breaker_open"] == 0 and h["dead_letters"] == 0
    assert proc.metric("edgepipe_bundle_active_version") == v
    kinds = [(e["kind"], e["version"]) for e in fleet.events(DEVICE)]
    assert kinds[:1] == [("desired", v)] and ("applied", v) in kinds
    assert proc.terminate() == 0


def test_bad_bundles_are_refused_with_the_reason_and_nothing_changes(
    tmp_path: Path, broker: Any, keyfile: Path, edge: Any, fleet: Fleet
) -> None:
    _edge_dir(tmp_path)
    retired_key, retired_pub = fleet.new_key("retired.key")
    stranger_key, _ = fleet.new_key("stranger.key")
    proc, cfg = _start(
        edge,
        tmp_path,
        broker,
        keyfile,
        fleet,
        trusted=[fleet.public_key, retired_pub],
        retired=[retired_pub],
    )
    older = fleet.bundle(write_filters(tmp_path / "old", [validity(0, 500)], tag="old"))
    good = fleet.bundle(write_filters(tmp_path / "good", [validity(0, 1000)], tag="good"))
    fleet.desire(DEVICE, good)
    _wait_state(fleet, "good applied", active_version=good, status="applied")
    edge_dir = tmp_path / "edge"
    pulled = edge_dir / "store.db.chain" / "filters.yaml"
    installed = pulled.read_bytes()

    def refused(version: int, reason: str) -> dict[str, Any]:
        fleet.desire(DEVICE, version)
        st = _wait_state(
            fleet,
            f"{reason} reported",
            status="failed",
            status_version=version,
            status_reason=reason,
        )
        assert st["active_version"] == good and not st["in_sync"] and st["status_detail"]
        assert pulled.read_bytes() == installed  # nothing changed
        return st

    def tag(name: str) -> Path:
        return write_filters(tmp_path / name, [validity(0, 2000)], tag=name)

    refused(fleet.bundle(tag("stranger"), key=stranger_key), "unknown_key")
    refused(fleet.bundle(tag("retired"), key=retired_key), "retired_key")
    refused(older, "downgrade")
    # a manifest changed after signing
    v = fleet.bundle(tag("tampered"))
    fleet.sql(
        "UPDATE bundles SET manifest = replace(manifest, '2000', '9999') WHERE version = ?", v
    )
    refused(v, "bad_signature")
    # a module changed after signing (its sha256 no longer matches)
    v = fleet.bundle(tag("module"))
    fleet.tamper_module(v, lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]))
    refused(v, "hash_mismatch")
    v = fleet.bundle(tag("module-grown"))
    fleet.tamper_module(v, lambda data: data + b"\0" * 100)
    st = refused(v, "too_large")
    assert "bytes" in st["status_detail"]
    # an expired window (made an hour-long validity two hours ago)
    from cloud._bundle_cli import create_bundle, load_signing_keys
    from cloud._settings import Settings

    keys, _, _ = load_signing_keys(Settings(signing_key_file=str(fleet.signing_key)))
    with fleet.backend() as b:
        made = create_bundle(
            b, keys[-1], tag("expired"), fleet="default", priority="normal",
            valid_days=1 / 24, now=now_ms() - 2 * 3_600_000,
        )  # fmt: skip
    refused(made["version"], "expired")
    # a chain that fails `edgepipe validate`: a config key the filter does not take
    bad = write_filters(tmp_path / "invalid", [validity(0, 10, config={"nonsense": 1})], tag="inv")
    st = refused(fleet.bundle(bad), "invalid_chain")
    assert "nonsense" in st["status_detail"] and "filters.yaml:" in st["status_detail"]
    assert proc.metric("edgepipe_chain_reloads_total", result="ok") == 1  # only the good one
    # the running chain is still the good one: 1000 passes, 1500 is dropped
    publish(broker, [reading_msg("s2", "pm25", 1, 1000.0), reading_msg("s2", "pm25", 2, 1500.0)])
    proc.wait_metric("edgepipe_messages_acked_total", 2, 30)
    assert stored_values(edge_dir / "store.db", keyfile) == [1000.0]
    # the highest applied version survives a restart: the older bundle is still a downgrade
    assert proc.terminate() == 0
    fleet.desire(DEVICE, good)
    proc = edge(cfg)
    proc.wait_subscribed()
    _wait_state(fleet, "good again after restart", active_version=good, status="applied")
    refused(older, "downgrade")
    assert proc.terminate() == 0


def test_an_offline_device_applies_only_the_latest_desired_bundle(
    tmp_path: Path, broker: Any, keyfile: Path, edge: Any, fleet: Fleet
) -> None:
    _edge_dir(tmp_path)
    proc, _ = _start(edge, tmp_path, broker, keyfile, fleet)
    v1 = fleet.bundle(write_filters(tmp_path / "v1", [validity(0, 100)], tag="v1"))
    fleet.desire(DEVICE, v1)
    _wait_state(fleet, "v1 applied", active_version=v1, status="applied")
    fleet.receiver.stop()  # the device is offline (the receiver is unreachable)
    v2 = fleet.bundle(write_filters(tmp_path / "v2", [validity(0, 200)], tag="v2"))
    v3 = fleet.bundle(write_filters(tmp_path / "v3", [validity(0, 300)], tag="v3"))
    fleet.desire(DEVICE, v2)
    fleet.desire(DEVICE, v3)
    publish(broker, [reading_msg("s3", "pm25", i, float(i * 10)) for i in range(40)])
    proc.wait_metric("edgepipe_messages_acked_total", 40, 30)  # still filtering with v1
    fleet.receiver.start()
    st = _wait_state(fleet, "v3 applied", active_version=v3, status="applied")
    assert st["previous_version"] == v1
    applied = [
        e["version"] for e in fleet.events(DEVICE) if e["kind"] in ("applied", "downloading")
    ]
    assert v2 not in applied and v3 in applied
    proc.wait_metric("edgepipe_chain_reloads_total", 2, 30, result="ok")  # v1, then v3
    assert proc.terminate() == 0


def test_a_normal_bundle_waits_for_an_unmetered_link_while_an_urgent_one_goes(
    tmp_path: Path, broker: Any, keyfile: Path, edge: Any, fleet: Fleet
) -> None:
    net = tmp_path / "sys" / "class" / "net"
    (net / "wwan0").mkdir(parents=True)
    (net / "wwan0" / "operstate").write_text("up\n")
    links = {"sysfs_root": str(tmp_path / "sys"), "poll_s": 0.1}
    _edge_dir(tmp_path)
    proc, _ = _start(edge, tmp_path, broker, keyfile, fleet, links=links)
    normal = fleet.bundle(write_filters(tmp_path / "n", [validity(0, 100)], tag="normal"))
    fleet.desire(DEVICE, normal)
    st = _wait_state(fleet, "normal bundle waiting", status="waiting", status_version=normal)
    assert st["active_version"] is None and "unmetered" in st["status_detail"]
    assert proc.metric("edgepipe_bundle_module_bytes_total") == 0  # nothing downloaded
    urgent = fleet.bundle(
        write_filters(tmp_path / "u", [validity(0, 200)], tag="urgent"), "--priority", "urgent"
    )
    fleet.desire(DEVICE, urgent)
    _wait_state(fleet, "urgent bundle applied on cellular", active_version=urgent, status="applied")
    assert proc.metric("edgepipe_bundle_module_bytes_total") > 0
    assert proc.metric("edgepipe_sync_bytes_total", link="cellular") > 0
    assert proc.terminate() == 0


def test_chain_source_local_refuses_bundles(
    tmp_path: Path, broker: Any, keyfile: Path, edge: Any, fleet: Fleet
) -> None:
    _edge_dir(tmp_path)
    proc, _ = _start(edge, tmp_path, broker, keyfile, fleet, chain_source="local")
    v = fleet.bundle(write_filters(tmp_path / "b", [validity(0, 100)], tag="local"))
    fleet.desire(DEVICE, v)
    st = _wait_state(
        fleet, "refused: local chain wins", status="failed", status_reason="chain_source_local"
    )
    assert st["active_version"] is None
    assert not (tmp_path / "edge" / "store.db.chain").exists()
    # a local bundle: it runs its local chain already, so applying it is a no-op success
    r = fleet.cli("bundle", "create", "--local")
    assert r.returncode == 0, r.stderr
    local = int(json.loads(r.stdout)["version"])
    fleet.desire(DEVICE, local)
    st = _wait_state(fleet, "local bundle: no-op", active_version=local, status="applied")
    assert "chain_source is local" in st["status_detail"] and st["chain"] == "local"
    assert not (tmp_path / "edge" / "store.db.chain").exists()
    assert proc.metric("edgepipe_chain_reloads_total", result="ok") == 0
    assert proc.terminate() == 0


def test_a_local_bundle_takes_the_device_back_to_its_configured_chain_for_good(
    tmp_path: Path, broker: Any, keyfile: Path, edge: Any, fleet: Fleet
) -> None:
    """On its local chain (passes everything), a bundle (drops 950000+), then a local bundle:
    the local chain runs again, no reading lost or twice across both swaps, and after a
    restart it still runs the local chain (the persisted state says so)."""
    _edge_dir(tmp_path)
    proc, cfg = _start(edge, tmp_path, broker, keyfile, fleet)
    wait_for(lambda: fleet.state(DEVICE)["reported_ms"], 30, "first check-in")
    v = fleet.bundle(write_filters(tmp_path / "b1", [validity(0, 900_000)], tag="to-local"))
    r = fleet.cli("bundle", "create", "--local", "--priority", "urgent")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    local = int(made["version"])
    assert made["chain"] == "local" and made["modules"] == 0 and local > v
    n, goal = 0, 10**6

    def load() -> None:  # MQTT load all through both swaps, at most 2000 ahead of the acks
        nonlocal n
        while n < goal:
            if proc.metric("edgepipe_messages_acked_total") < n - 2000:
                continue
            publish(broker, [reading_msg("s1", "pm25", n + i, float(n + i)) for i in range(200)])
            n += 200

    def probe(base: int) -> tuple[list[float], list[float]]:
        """5 readings the bundle drops and the local chain keeps, 5 both keep."""
        hi = [950_000.0 + base + i for i in range(5)]
        lo = [800_000.0 + base + i for i in range(5)]
        msgs = [reading_msg("s1", "pm25", 10**7 + base + i, x) for i, x in enumerate(hi)]
        msgs += [reading_msg("s1", "pm25", 2 * 10**7 + base + i, x) for i, x in enumerate(lo)]
        publish(broker, msgs)
        return hi, lo

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_for(lambda: n >= 600, 30, "load running")
        fleet.desire(DEVICE, v)
        _wait_state(fleet, "bundle applied", active_version=v, status="applied")
        proc.wait_metric("edgepipe_chain_reloads_total", 1, 30, result="ok")
        at = n
        wait_for(lambda: n >= at + 1200, 60, "load after the first swap")
        fleet.desire(DEVICE, local)
        st = _wait_state(fleet, "local bundle applied", active_version=local, status="applied")
        proc.wait_metric("edgepipe_chain_reloads_total", 2, 30, result="ok")
        goal = n + 1200  # and then some more on the local chain
    finally:
        goal = min(goal, n + 1200)
        loader.join()
    assert st["previous_version"] == v and st["chain"] == "local" and st["in_sync"]
    state = json.loads((tmp_path / "edge" / "store.db.bundle.json").read_text())
    assert state["chain"] == "local" and state["active_version"] == local
    assert state["highest"] == local
    assert proc.metric("edgepipe_bundle_active_version") == local
    hi, lo = probe(0)  # the local chain runs: nothing of the probe is dropped
    expected = sorted([float(i) for i in range(n)] + hi + lo)
    proc.wait_metric("edgepipe_messages_acked_total", n + 10, 60)
    values = stored_values(tmp_path / "edge" / "store.db", keyfile)
    assert sorted(values) == expected  # nothing lost, nothing twice, across both swaps
    assert proc.terminate() == 0

    # restarted: the local chain still runs (not the pulled chain file, which is still there)
    assert (tmp_path / "edge" / "store.db.chain" / "filters.yaml").exists()
    proc = edge(cfg)
    proc.wait_subscribed()
    hi2, lo2 = probe(100)
    proc.wait_metric("edgepipe_messages_acked_total", 10, 60)
    values = stored_values(tmp_path / "edge" / "store.db", keyfile)
    assert sorted(values) == sorted(expected + hi2 + lo2)
    assert proc.metric("edgepipe_bundle_active_version") == local
    wait_for(lambda: _synced(fleet)["readings"] == len(values), 60, "all synced")
    c = _synced(fleet)
    assert c["readings"] == c["distinct"] == len(values)
    st = fleet.state(DEVICE)
    assert st["active_version"] == local and st["chain"] == "local"
    assert proc.terminate() == 0
