"""The device overlay's pod run for real: mosquitto with the ConfigMap's mosquitto.conf and
``edgepipe run`` with the ConfigMaps' pipeline.yaml and filters.yaml (paths mapped into a
temporary directory), and a ConfigMap update reaching the running pipeline as a hot reload.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.k3s import Pod, configmap_file


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    p = Pod(tmp_path)
    try:
        p.start_broker()
        yield p
    finally:
        p.close()


def test_pod_configuration_runs(pod: Pod) -> None:
    """mosquitto with the ConfigMap's mosquitto.conf and `edgepipe run` with the ConfigMaps'
    pipeline.yaml and filters.yaml become ready, take a reading over authenticated MQTT and
    stop cleanly on SIGTERM."""
    assert pod.publish("temperature", "1", user="") == "Not authorized"  # anonymous
    assert pod.publish("temperature", "1", password="wrong") == "Not authorized"
    pod.start_edge()
    assert pod.get("/healthz") == (200, "ok\n")
    assert pod.publish("temperature", '{"value": 21.5, "seq": 1}') == "Success"
    assert (
        pod.publish("temperature", '{"value": 120, "seq": 2}') == "Success"
    )  # impossible: dropped
    pod.wait_acked(2)
    # the chain from the chain ConfigMap ran
    assert pod.metric("edgepipe_readings_dropped_total", stage="validity") == 1
    assert pod.metric("process_resident_memory_bytes") > 0
    assert pod.edge is not None
    pod.edge.send_signal(signal.SIGTERM)
    assert pod.edge.wait(60) == 0, pod.logs()
    assert (pod.store / "store.db").exists()


def test_configmap_update_hot_reloads_the_chain(pod: Pod) -> None:
    """A ConfigMap update (the kubelet's ..data swap) reaches the running pipeline: the new
    chain takes over without a restart; a broken one is refused and the old one stays."""
    pod.start_edge()
    assert pod.edge is not None
    pid = pod.edge.pid

    def dropped() -> float:
        return pod.metric("edgepipe_readings_dropped_total", stage="validity")

    assert pod.publish("temperature", '{"value": 120, "seq": 1}') == "Success"  # above 85: dropped
    pod.wait_acked(1)
    assert dropped() == 1

    original = configmap_file(pod.docs, "edgepipe-chain", "filters.yaml")
    assert "temperature: [-40, 85]" in original
    pod.update_chain(original.replace("temperature: [-40, 85]", "temperature: [-40, 150]"))
    pod._until(
        lambda: pod.metric("edgepipe_chain_reloads_total", result="ok") >= 1,
        "the chain reload",
        pod.edge,
    )
    assert pod.publish("temperature", '{"value": 120, "seq": 2}') == "Success"  # now within range
    pod.wait_acked(2)
    assert dropped() == 1

    pod.update_chain(original.replace("validity.wasm", "no-such-filter.wasm"))
    pod._until(
        lambda: (
            pod.metric("edgepipe_chain_reloads_total")
            > pod.metric("edgepipe_chain_reloads_total", result="ok")
        ),
        "the refused reload",
        pod.edge,
    )
    assert (
        pod.publish("temperature", '{"value": 140, "seq": 3}') == "Success"
    )  # the [-40, 150] chain
    pod.wait_acked(3)
    assert dropped() == 1
    assert pod.edge.pid == pid and pod.edge.poll() is None
