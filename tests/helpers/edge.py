"""An edge under test: its ``pipeline.yaml``, the ``edgepipe run`` child process, its
``/readyz`` and ``/metrics``, publishing to the broker, and waiting for a condition."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

from devtools._mosquitto import Mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO / "data" / "airquality-uci.csv"

__all__ = [
    "DATASET",
    "REPO",
    "EdgeProcess",
    "free_port",
    "make_config",
    "metric",
    "publish",
    "reading_msg",
    "readyz",
    "wait_for",
]


def make_config(tmp_path: Path, broker: Mosquitto, keyfile: Path, **sections: object) -> Path:
    """Write a pipeline.yaml for a test; ``sections`` override top-level keys.

    The health listener is on by default (a free loopback port) so that tests observe the
    process through ``/readyz`` and ``/metrics``."""
    cfg: dict[str, object] = {
        "device": {"id": "test-device"},
        "broker": {
            "host": broker.host,
            "port": broker.port,
            "client_id": f"edgepipe-test-{tmp_path.name}",
        },
        "subscriptions": [{"topic": "sensors/{device}/{metric}", "qos": 1}],
        "batch": {"max_messages": 200, "max_delay_ms": 10},
        "store": {"path": str(tmp_path / "store.db"), "key": {"file": str(keyfile)}},
        "sync": {"enabled": False},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }
    cfg.update(sections)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode().strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode().strip()


def readyz(port: int) -> tuple[int, str]:
    """``GET /readyz``: (200, "ready") or (503, why not); raises while nothing listens."""
    return _get(port, "/readyz")


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of a metric's samples (those with ``labels``) from an edgepipe's /metrics;
    0 for a series that has no sample yet."""
    status, text = _get(port, "/metrics")
    assert status == 200, text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, lbl = head.partition("{")
        if series != name:
            continue
        if any(f'{k}="{v}"' not in lbl for k, v in labels.items()):
            continue
        total += float(value)
    return total


class EdgeProcess:
    """``edgepipe run`` in a child process, observed through its health listener."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None
        listen = (yaml.safe_load(config.read_text()).get("metrics") or {}).get("listen")
        self.port: int | None = int(str(listen).rpartition(":")[2]) if listen else None

    def start(self) -> EdgeProcess:
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "-c", str(self.config)],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        if self.alive():
            self.kill9()
        if hasattr(self, "_logf"):
            self._logf.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    # -- observing the process ----------------------------------------------------------
    def _port(self) -> int:
        assert self.port is not None, "this config has no metrics.listen"
        return self.port

    def readyz(self) -> tuple[int, str] | None:
        """``/readyz`` as (status, body); None while the listener is not up (yet)."""
        try:
            return readyz(self._port())
        except OSError:
            return None

    def metric(self, name: str, **labels: str) -> float:
        """A metric's value; raises while the listener is not up."""
        return metric(self._port(), name, **labels)

    def wait_ready(self, timeout: float = 30) -> None:
        """Until ``/readyz`` answers 200; fails early if the process exits."""
        wait_for(lambda: not self.alive() or (self.readyz() or (0,))[0] == 200, timeout, "ready")
        assert self.alive(), self.output()

    def wait_metric(self, name: str, at_least: float, timeout: float = 30, **labels: str) -> float:
        """Until ``name`` (with ``labels``) reaches ``at_least``; returns its value."""

        def reached() -> float | None:
            if not self.alive():
                raise AssertionError(f"edgepipe exited waiting for {name}:\n{self.output()}")
            try:
                v = self.metric(name, **labels)
            except OSError:
                return None
            return v if v >= at_least else None

        return wait_for(reached, timeout, f"{name}{labels or ''} >= {at_least}")  # type: ignore[return-value]

    def wait_subscribed(self, count: int = 1, timeout: float = 20) -> None:
        """Until the broker has acknowledged ``count`` subscriptions (one per connection)."""
        self.wait_metric("edgepipe_mqtt_subscribes_total", count, timeout)


def wait_for(pred: Callable[[], object], timeout: float = 30, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling interval, not synchronisation


def publish(broker: Mosquitto, messages: list[tuple[str, bytes]], qos: int = 1) -> None:
    """Publish and wait until the broker has acknowledged every message."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"pub-{os.getpid()}-{time.monotonic_ns()}",
    )
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        infos = [c.publish(t, p, qos=qos) for t, p in messages]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


def reading_msg(
    device: str,
    metric: str,
    seq: int,
    value: float,
    ts: float | None = None,
) -> tuple[str, bytes]:
    body = {"seq": seq, "value": value, "ts": ts if ts is not None else 1_700_000_000 + seq}
    return f"sensors/{device}/{metric}", json.dumps(body).encode()
