"""pipeline.yaml validation, located errors, secrets, and the CLI's messages and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from config._models import Secret
from devtools._mosquitto import Mosquitto, free_port
from pipeline import ConfigError, load_config
from tests.helpers.edge import REPO, make_config, publish, reading_msg, wait_for
from tests.helpers.store import stored


def edgepipe(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    return p


MINIMAL = "subscriptions:\n  - topic: sensors/{device}/{metric}\n"


def test_example_config_is_valid(tmp_path, keyfile):
    """The example as the README tells an operator to adapt it: its store key made, its
    device secret given (tests/test_validate_secrets.py: what validate says without)."""
    text = (REPO / "pipeline.yaml").read_text().replace("/etc/edgepipe/store.key", str(keyfile))
    example = write(tmp_path, text.replace("filters/lib/", f"{REPO}/filters/lib/"))
    r = edgepipe("validate", "-c", str(example), env={"EDGEPIPE_DEVICE_SECRET": "ab" * 32})
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


@pytest.mark.parametrize(
    "text, line, col, words",
    [
        (MINIMAL + "broker:\n  port: 1883\n  hots: x\n", 5, 3, "unknown key 'hots'"),
        (MINIMAL + "broker:\n  port: 99999\n", 4, 9, "broker.port"),
        ("subscriptions:\n  - topic: a/{device}\n    qos: 2\n", 3, 10, "subscriptions.0.qos"),
        ("broker: {}\n", 1, 1, "missing required key 'subscriptions'"),
        (
            MINIMAL + "chain:\n  - name: a\n    module: a.wasm\n  - name: a\n    module: b.wasm\n",
            4,
            3,
            "used twice",
        ),
        (MINIMAL + "store:\n  key: {file: /k, env: K}\n", 4, 8, "exactly one"),
        ("subscriptions: [\n", 2, 1, "invalid YAML"),
        (MINIMAL + "broker:\n  port: 1\n  port: 2\n", 5, 3, "duplicate key 'port'"),
    ],
)
def test_errors_are_located(tmp_path, text, line, col, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    e = exc.value
    assert (e.line, e.col) == (line, col), str(e)
    assert words in str(e)
    assert str(e).startswith(f"{path}:{line}:{col}: ")


def test_validate_cli_reports_location_without_traceback(tmp_path):
    path = write(tmp_path, MINIMAL + "batch:\n  max_messages: many\n")
    r = edgepipe("validate", "-c", str(path))
    assert r.returncode == 2
    assert r.stderr.startswith(f"edgepipe: {path}:4:17: batch.max_messages")
    assert "Traceback" not in r.stderr


def test_run_with_invalid_config_starts_nothing(tmp_path):
    path = write(tmp_path, MINIMAL + "store:\n  path: " + str(tmp_path / "s.db") + "\n  bogus: 1\n")
    r = edgepipe("run", "-c", str(path))
    assert r.returncode == 2 and ":5:3:" in r.stderr
    assert not (tmp_path / "s.db").exists()


def test_missing_config_file_is_a_clear_error(tmp_path):
    r = edgepipe("validate", "-c", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert "cannot read config" in r.stderr and "Traceback" not in r.stderr


def test_secrets_from_file_env_and_literal(tmp_path, monkeypatch):
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    monkeypatch.setenv("EP_TEST_PW", "from-env")
    assert Secret.model_validate({"file": str(f)}).get() == "from-file"
    assert Secret.model_validate({"env": "EP_TEST_PW"}).get() == "from-env"
    assert Secret.model_validate("literal").get() == "literal"
    s = Secret.model_validate("hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    monkeypatch.delenv("EP_TEST_PW")
    with pytest.raises(LookupError, match="EP_TEST_PW is not set"):
        Secret.model_validate({"env": "EP_TEST_PW"}).get()


def test_schema_is_json_schema_and_docs_are_current():
    r = edgepipe("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert schema["additionalProperties"] is False
    assert {"broker", "subscriptions", "chain", "store", "sync"} <= set(schema["properties"])
    committed = json.loads((REPO / "docs/pipeline.schema.json").read_text())
    assert committed == schema, "docs/pipeline.schema.json is stale: edgepipe schema -o ..."
    md = edgepipe("schema", "--format", "markdown").stdout
    assert (REPO / "docs/configuration.md").read_text() == md, (
        "docs/configuration.md is stale: edgepipe schema --format markdown -o docs/configuration.md"
    )


def test_metrics_reference_is_current_and_complete(tmp_path, broker, keyfile, edge):
    r = edgepipe("metrics")
    assert r.returncode == 0, r.stderr
    assert (REPO / "docs/metrics.md").read_text() == r.stdout, (
        "docs/metrics.md is stale: edgepipe metrics -o docs/metrics.md"
    )
    documented = {line.split("`")[1] for line in r.stdout.splitlines() if line.startswith("| `")}
    # everything a running edge process serves is in the reference
    port = free_port()
    proc = edge(make_config(tmp_path, broker, keyfile, metrics={"listen": f"127.0.0.1:{port}"}))
    proc.wait_subscribed()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        served = {x.split()[2] for x in resp.read().decode().splitlines() if x.startswith("# HELP")}
    assert proc.terminate() == 0
    assert len(served) > 20
    assert served <= documented, f"not in docs/metrics.md: {sorted(served - documented)}"


def test_cli_usage_errors():
    r = edgepipe()
    assert r.returncode == 2 and "usage" in r.stderr
    r = edgepipe("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert edgepipe("--version").stdout.startswith("edgepipe ")


def test_no_broker_at_start_retries_then_connects(tmp_path, keyfile, edge):
    """No broker yet: a clear log line and backoff, not a crash; connects once it appears."""
    port = free_port()
    broker = Mosquitto(port=port)
    cfg = make_config(tmp_path, broker, keyfile)
    proc = edge(cfg)
    # still retrying, alive and not ready, after more than one failed attempt
    proc.wait_metric("edgepipe_mqtt_connect_failures_total", 2, 20)
    assert proc.alive(), proc.output()
    # the log line is what the operator reads
    assert "cannot connect to MQTT broker" in proc.output()
    assert proc.readyz() == (503, "not ready: not connected to the MQTT broker")
    assert proc.metric("edgepipe_mqtt_connects_total") == 0
    with broker:
        proc.wait_subscribed(timeout=40)
        assert proc.readyz() == (200, "ready")
        publish(broker, [reading_msg("d", "m", 1, 1.0)])
        # the reading published after the broker appeared is stored
        proc.wait_metric("edgepipe_readings_stored_total", 1, 20)
        assert proc.terminate() == 0
    assert [(d, m, v) for d, m, _, v in stored(tmp_path / "store.db", keyfile)] == [("d", "m", 1.0)]
    assert "Traceback" not in proc.output()


def test_sigterm_finishes_the_batch_in_hand(tmp_path, broker, keyfile, edge):
    """SIGTERM right after a burst: what was taken off the socket is committed and acked;
    what was not stays with the broker for the next run. Nothing is lost either way."""
    cfg = make_config(tmp_path, broker, keyfile, batch={"max_messages": 50, "max_delay_ms": 200})
    proc = edge(cfg)
    proc.wait_subscribed()
    n = 2000
    publish(broker, [reading_msg("d", "m", i, float(i)) for i in range(n)])
    assert proc.terminate() == 0
    first = len(stored(tmp_path / "store.db", keyfile))
    proc2 = edge(cfg)
    proc2.wait_subscribed()
    db = tmp_path / "store.db"
    wait_for(lambda: len(stored(db, keyfile)) >= n, 30, "the rest after restart")
    assert proc2.terminate() == 0
    values = sorted(v for *_, v in stored(db, keyfile))
    assert values == [float(i) for i in range(n)], f"first run stored {first}"
