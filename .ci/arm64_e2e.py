"""The installed edge end to end, as .ci/arm64.sh runs it inside the arm64 root.

mosquitto (the root's own binary), the ``edgepipe`` console script from the installed wheel
with the example's three-stage chain (validity, calibrate, window), N QoS 1 readings queued
in the broker's persistent session, ``kill -9`` while the backlog is being committed and one
restart; then ``edgepipe export`` must list exactly the expected readings and the window
aggregates computed from them here: nothing missing, nothing twice, every value bit-exact.
It runs on x86-64 too (``python -m pytest .ci/arm64_e2e.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from devtools._mosquitto import Mosquitto, free_port
from storage import generate_key_line
from tests.helpers.edge import REPO, EdgeProcess, publish, reading_msg, wait_for
from tests.helpers.store import stored

N = 5000
DEVICES = ("aq-01", "aq-02")
METRICS = ("CO_GT", "T", "RH")
T0 = 1_700_000_000  # seconds; one reading a second spans several 10-minute windows


def _edgepipe() -> str:
    exe = Path(sys.executable).with_name("edgepipe")
    found = str(exe) if exe.exists() else shutil.which("edgepipe")
    if found is None:
        pytest.fail("the edgepipe console script is not installed next to this python")
    return found


class InstalledEdge(EdgeProcess):
    """``edgepipe run`` through the installed console script, outside the source tree."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(config, log)
        self.env = {**os.environ, **(env or {})}

    def start(self) -> InstalledEdge:
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [_edgepipe(), "run", "-c", str(self.config)],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            cwd=str(self.config.parent),
            env=self.env,
        )
        return self


def _config(tmp: Path, broker: Mosquitto) -> Path:
    """The example pipeline.yaml, pointed at this broker, store and health port."""
    cfg = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    key = tmp / "store.key"
    key.write_text(generate_key_line() + "\n")
    key.chmod(0o600)
    cfg["device"]["id"] = "test-device"  # the device tests.helpers.store reads the store as
    cfg["broker"].update(host=broker.host, port=broker.port, client_id="edgepipe-arm64-e2e")
    cfg["batch"]["max_messages"] = 100  # many commits, so the kill lands between two
    for st in cfg["chain"]:
        st["module"] = str(REPO / st["module"])
    cfg["store"].update(path=str(tmp / "store.db"), key={"file": str(key)})
    cfg["sync"] = {"enabled": False}
    cfg["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _messages() -> tuple[list[tuple[str, bytes]], Counter]:
    """N readings and what the example chain makes of them, as (device, metric, ts, value)."""
    chain = yaml.safe_load((REPO / "pipeline.yaml").read_text())["chain"]
    validity, calibrate, window = (st["config"] for st in chain)
    scale, offset = calibrate["scale.CO_GT"], calibrate["offset.CO_GT"]
    window_ms = window["window_s"] * 1000
    msgs, raw = [], []
    for i in range(N):
        device, metric = DEVICES[i % 2], METRICS[(i // 2) % 3]
        value = (i % 500) / 10
        if i % 17 == 0:
            value = float(validity["sentinel"])  # the "missing" sentinel: filtered out
        elif metric == "T" and i % 23 == 0:
            value = 99.5  # outside validity's T range: filtered out
        msgs.append(reading_msg(device, metric, i, value, ts=T0 + i))
        lo, hi = validity["range"].get(metric, (float("-inf"), float("inf")))
        if value == validity["sentinel"] or not lo <= value <= hi:
            continue
        if metric == "CO_GT":
            value = value * scale + offset
        raw.append((device, metric, (T0 + i) * 1000, value))
    # window: per series and 10-minute window, in arrival order, emitted at the window's start
    wins: dict[tuple[str, str, int], list[float]] = {}
    for device, metric, ts, value in raw:
        wins.setdefault((device, metric, ts // window_ms * window_ms), []).append(value)
    expected = Counter(raw)
    for (device, metric, start), vals in wins.items():
        total = 0.0
        for v in vals:
            total += v
        expected[(device, f"{metric}_mean", start, total / len(vals))] += 1
        expected[(device, f"{metric}_min", start, min(vals))] += 1
        expected[(device, f"{metric}_max", start, max(vals))] += 1
        expected[(device, f"{metric}_count", start, float(len(vals)))] += 1
    return msgs, expected


def test_example_chain_survives_kill9_and_exports_exactly(tmp_path):
    msgs, expected = _messages()
    with Mosquitto() as broker:
        cfg = _config(tmp_path, broker)
        db, key = tmp_path / "store.db", tmp_path / "store.key"
        # the first run creates the persistent session; the readings then queue in the broker
        edge = InstalledEdge(cfg, tmp_path / "edge-0.log").start()
        edge.wait_subscribed(timeout=60)
        assert edge.terminate(60) == 0
        publish(broker, msgs)
        # slowed commits keep a backlog in flight: the kill lands in the middle of it
        edge = InstalledEdge(cfg, tmp_path / "edge-1.log", {"EDGEPIPE_FAULT": "slow_commit:50"})
        edge.start()
        try:
            edge.wait_metric("edgepipe_readings_stored_total", 1000, timeout=120)
            edge.kill9()
        finally:
            edge.close()
        before = len(stored(db, key))
        assert 1000 <= before < len(expected), "the kill did not land mid-stream"
        edge = InstalledEdge(cfg, tmp_path / "edge-2.log").start()
        try:
            # everything queued arrives; then a marker behind it proves nothing is left over
            n_raw = sum(c for (_, m, *_), c in expected.items() if m in METRICS)
            wait_for(
                lambda: sum(1 for _, m, *_ in stored(db, key) if m in METRICS) >= n_raw,
                180,
                "every queued reading stored after the restart",
            )
            acked = edge.metric("edgepipe_messages_acked_total")
            publish(broker, [reading_msg("marker", "done", 0, 1.0, ts=T0)])
            edge.wait_metric("edgepipe_messages_acked_total", acked + 1, timeout=60)
            assert edge.terminate(60) == 0  # a clean stop flushes the open windows
        finally:
            edge.close()
    out = subprocess.run(
        [_edgepipe(), "export", "-c", str(cfg), "--format", "jsonl"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    got = Counter(
        (r["device"], r["metric"], r["ts"], r["value"]) for r in rows if r["device"] != "marker"
    )
    missing, extra = expected - got, got - expected
    assert not missing and not extra, (
        f"{sum(missing.values())} missing, e.g. {sorted(missing)[:5]}; "
        f"{sum(extra.values())} unexpected or doubled, e.g. {sorted(extra)[:5]}"
    )
    assert {r["metric"] for r in rows if r["device"] == "marker"} >= {"done"}
