"""Chain hot reload in a running pipeline, through a ConfigMap-style mounted directory.

kubelet updates a ConfigMap volume atomically: the files are symlinks into ``..data``,
which points at a timestamped directory; an update writes a new directory and renames a
new ``..data`` symlink over the old one.  The tests do exactly that.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import yaml

from devtools._mosquitto import free_port
from tests.helpers.edge import REPO, make_config, publish, reading_msg, wait_for
from tests.helpers.store import stored

VALIDITY = str(REPO / "filters/lib/validity.wasm")
EMA = str(REPO / "filters/lib/ema.wasm")


def _chain(lo: float, hi: float) -> dict:
    return {
        "version": 1,
        "chain": [
            {
                "name": "validity",
                "module": VALIDITY,
                "kind": "filter",
                "config": {"min": lo, "max": hi},
            }
        ],
    }


class ConfigMapDir:
    """A directory laid out like a mounted ConfigMap volume."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.n = 0

    def update(self, files: dict[str, str]) -> None:
        self.n += 1
        ts = self.root / f"..2026_11_29_12_00_{self.n:02d}.{os.getpid()}"
        ts.mkdir()
        for name, text in files.items():
            (ts / name).write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(ts.name)
        os.replace(tmp, self.root / "..data")  # the atomic swap
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")


def _values(tmp_path, keyfile) -> list[float]:
    return sorted(v for *_, v in stored(tmp_path / "store.db", keyfile))


def test_configmap_update_swaps_the_chain_without_loss(tmp_path, broker, keyfile, edge):
    cm = ConfigMapDir(tmp_path / "chain")
    cm.update({"filters.yaml": yaml.safe_dump(_chain(0, 100))})
    cfg = make_config(tmp_path, broker, keyfile, chain_file=str(cm.root / "filters.yaml"))
    proc = edge(cfg)
    proc.wait_subscribed()
    publish(broker, [reading_msg("d", "m", i, float(i)) for i in range(0, 200)])
    wait_for(lambda: len(_values(tmp_path, keyfile)) == 101, 20, "first chain's output")

    cm.update({"filters.yaml": yaml.safe_dump(_chain(0, 150))})
    # the watcher counts the reload and swaps in the same event-loop step (no batch in hand)
    proc.wait_metric("edgepipe_chain_reloads_total", 1, 20, result="ok")
    publish(broker, [reading_msg("d", "m", i, float(i)) for i in range(200, 400)])
    # second burst: the values 200..399 pass the new range [0, 150] only if <= 150: none
    publish(broker, [reading_msg("d", "m", 1000 + i, float(i) / 2) for i in range(0, 301)])
    expected = [float(i) for i in range(101)] + [i / 2 for i in range(301)]
    wait_for(lambda: len(_values(tmp_path, keyfile)) >= len(expected), 20, "second output")
    proc.wait_metric("edgepipe_messages_acked_total", 200 + 200 + 301, 20)
    assert proc.metric("edgepipe_chain_reloads_total", result="ok") == 1
    assert proc.metric("edgepipe_chain_reloads_total", result="error") == 0
    assert proc.terminate() == 0
    assert _values(tmp_path, keyfile) == sorted(expected)  # none lost, none twice


def test_broken_update_keeps_the_running_chain(tmp_path, broker, keyfile, edge):
    cm = ConfigMapDir(tmp_path / "chain")
    cm.update({"filters.yaml": yaml.safe_dump(_chain(0, 10))})
    cfg = make_config(tmp_path, broker, keyfile, chain_file=str(cm.root / "filters.yaml"))
    proc = edge(cfg)
    proc.wait_subscribed()
    bad = yaml.safe_dump(_chain(0, 10)).replace("kind: filter", "kind: filtre")
    cm.update({"filters.yaml": bad})
    proc.wait_metric("edgepipe_chain_reloads_total", 1, 20, result="error")
    # the located error message in the log is the operator-facing feature under test
    line = [ln for ln in proc.output().splitlines() if "new chain refused" in ln][0]
    assert "filters.yaml:" in line and "kind" in line  # located: file:line:col
    publish(broker, [reading_msg("d", "m", i, float(i)) for i in range(20)])
    wait_for(lambda: len(_values(tmp_path, keyfile)) == 11, 20, "old chain still filtering")
    proc.wait_metric("edgepipe_messages_acked_total", 20, 20)
    assert proc.readyz() == (200, "ready")
    assert proc.metric("edgepipe_chain_reloads_total", result="ok") == 0
    assert proc.terminate() == 0
    assert _values(tmp_path, keyfile) == [float(i) for i in range(11)]


def test_broken_chain_at_start_waits_not_ready_then_recovers(tmp_path, broker, keyfile, edge):
    """Not ready and not consuming while the chain file is broken: the broker keeps the
    messages (persistent session from an earlier run); a fixed file starts the flow."""
    cm = ConfigMapDir(tmp_path / "chain")
    cm.update({"filters.yaml": yaml.safe_dump(_chain(0, 1000))})
    port = free_port()
    cfg = make_config(
        tmp_path,
        broker,
        keyfile,
        chain_file=str(cm.root / "filters.yaml"),
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    first = edge(cfg)  # establishes the persistent session
    first.wait_subscribed()
    assert first.terminate() == 0

    cm.update({"filters.yaml": "chain:\n  - name: v\n    module: /nonexistent.wasm\n"})
    proc = edge(cfg)
    proc.wait_metric("edgepipe_chain_load_errors_total", 1, 20)
    publish(broker, [reading_msg("d", "m", i, float(i)) for i in range(50)])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
        assert r.status == 200
    assert proc.readyz() == (503, "not ready: filter chain not loaded")
    assert proc.metric("edgepipe_mqtt_connects_total") == 0  # not consuming
    assert not (tmp_path / "store.db").exists() or _values(tmp_path, keyfile) == []

    cm.update({"filters.yaml": json.dumps(_chain(0, 1000))})
    wait_for(lambda: len(_values(tmp_path, keyfile)) == 50, 30, "messages after the fix")
    proc.wait_ready(10)
    assert proc.metric("edgepipe_chain_reloads_total", result="ok") == 1
    assert proc.terminate() == 0
    assert _values(tmp_path, keyfile) == [float(i) for i in range(50)]


def test_filter_state_survives_kill9(tmp_path, broker, keyfile, edge):
    """An EMA continues exactly where it was after kill -9 at random points: its state is
    committed in the same transaction as the batch it produced, and redeliveries are
    skipped before the chain, so no reading is smoothed twice."""
    import random

    alpha = 0.3
    cfg = make_config(
        tmp_path,
        broker,
        keyfile,
        batch={"max_messages": 40, "max_delay_ms": 5},
        chain=[{"name": "ema", "module": EMA, "kind": "map", "config": {"alpha": alpha}}],
    )
    rng = random.Random(7)
    values = [rng.uniform(0, 100) for _ in range(1500)]
    msgs = [reading_msg("d", "m", i, v, ts=1_700_000_000 + i) for i, v in enumerate(values)]
    sent = 0
    proc = edge(cfg)
    for _ in range(4):
        proc.wait_subscribed()
        chunk = rng.randint(200, 400)
        publish(broker, msgs[sent : sent + chunk])
        sent += chunk
        half = sent - chunk // 2
        wait_for(lambda h=half: len(stored(tmp_path / "store.db", keyfile)) > h, 20)
        proc.kill9()
        proc = edge(cfg)
    proc.wait_subscribed()
    publish(broker, msgs[sent:])
    wait_for(lambda: len(stored(tmp_path / "store.db", keyfile)) >= len(values), 30, "all")
    assert proc.terminate() == 0
    got = [v for *_, v in sorted(stored(tmp_path / "store.db", keyfile), key=lambda r: r[2])]
    ema, expected = None, []
    for v in values:
        ema = v if ema is None else ema + alpha * (v - ema)
        expected.append(ema)
    assert len(got) == len(expected)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-9


def test_deploy_and_rollback_against_a_running_pipeline(tmp_path, broker, keyfile, edge):
    """`edgepipe deploy` swaps the chain of the running process; `edgepipe rollback`
    brings the previous one back; a deploy that fails validation changes nothing."""
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )

    chain_file = tmp_path / "filters.yaml"
    chain_file.write_text(yaml.safe_dump(_chain(0, 10)))
    cfg = make_config(tmp_path, broker, keyfile, chain_file=str(chain_file))
    proc = edge(cfg)
    proc.wait_subscribed()

    def burst(seq0: int) -> None:
        publish(broker, [reading_msg("d", "m", seq0 + i, float(i)) for i in range(30)])

    burst(0)  # 0..10 pass
    wait_for(lambda: len(_values(tmp_path, keyfile)) == 11, 20, "v1 output")

    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(_chain(0, 20)))
    r = cli("deploy", str(new), "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    proc.wait_metric("edgepipe_chain_reloads_total", 1, 20, result="ok")
    burst(100)  # 0..20 pass
    wait_for(lambda: len(_values(tmp_path, keyfile)) == 11 + 21, 20, "v2 output")

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_chain(0, 20)).replace("kind: filter", "kind: nope"))
    r = cli("deploy", str(bad), "-c", str(cfg))
    assert r.returncode == 2 and "bad.yaml:" in r.stderr  # located, nothing installed

    r = cli("rollback", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    proc.wait_metric("edgepipe_chain_reloads_total", 2, 20, result="ok")
    burst(200)  # back to 0..10
    wait_for(lambda: len(_values(tmp_path, keyfile)) == 11 + 21 + 11, 20, "v1 again")
    assert proc.terminate() == 0
    assert len(_values(tmp_path, keyfile)) == 43  # nothing lost, nothing twice
