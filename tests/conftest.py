"""Shared fixtures: a private mosquitto per test session, keys, configs, edgepipe processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from devtools._mosquitto import Mosquitto, free_port
from storage import generate_key_line

pytest_plugins = ["tests.skip_gate"]

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "data" / "airquality-uci.csv"


@pytest.fixture(scope="session")
def broker() -> Iterator[Mosquitto]:
    with Mosquitto() as b:
        yield b


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    p = tmp_path / "store.key"
    p.write_text(generate_key_line() + "\n")
    p.chmod(0o600)
    return p


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[object]:
    """``edgepipe-cloud serve`` (``tests._sync_env.Receiver``) with the device ``edge-1``
    registered; its secret is ``receiver.secret``."""
    from tests._sync_env import Receiver

    r = Receiver(tmp_path)
    r.secret = r.add_device("edge-1")  # type: ignore[attr-defined]
    with r:
        yield r


def make_config(tmp_path: Path, broker: Mosquitto, keyfile: Path, **sections: object) -> Path:
    """Write a pipeline.yaml for a test; ``sections`` override top-level keys."""
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
        "metrics": {"listen": None},
    }
    cfg.update(sections)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class EdgeProcess:
    """``edgepipe run`` in a child process."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

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


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Callable[[Path], EdgeProcess]]:
    procs: list[EdgeProcess] = []

    def start(config: Path) -> EdgeProcess:
        p = EdgeProcess(config, tmp_path / f"edge-{len(procs)}.log").start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


def wait_for(pred: Callable[[], object], timeout: float = 30, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


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


__all__ = [
    "DATASET",
    "REPO",
    "EdgeProcess",
    "free_port",
    "make_config",
    "publish",
    "reading_msg",
    "wait_for",
]
