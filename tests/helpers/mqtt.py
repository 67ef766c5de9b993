"""MQTT side of the edge tests: a QoS 1 publisher thread, numbered messages, a config with
extra ``broker:`` settings, and starting an edge process until it has subscribed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from devtools._mosquitto import Mosquitto
from tests.helpers.edge import EdgeProcess, make_config

__all__ = ["Publisher", "config", "drain", "publish_now", "seq_message", "started"]


def seq_message(seq: int, device: str = "d1") -> tuple[str, bytes]:
    body = {"seq": seq, "value": seq, "ts": 1_700_000_000_000 + seq}
    return f"sensors/{device}/temp", json.dumps(body).encode()


class Publisher(threading.Thread):
    """Publishes ``messages`` at QoS 1 (about ``rate`` per second) from its own thread and
    waits for the broker's PUBACK of each; survives broker restarts (persistent session,
    paho resends what was in flight)."""

    def __init__(
        self,
        broker: Mosquitto,
        messages: list[tuple[str, bytes]],
        rate: float = 3000,
        qos: int = 1,
        client_id: str = "test-publisher",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.messages, self.rate, self.qos = messages, rate, qos
        self.c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{client_id}-{time.monotonic_ns()}",
            clean_session=False,
        )
        self.c.max_inflight_messages_set(200)
        self.c.max_queued_messages_set(0)
        self.c.reconnect_delay_set(0.1, 0.5)
        if username:
            self.c.username_pw_set(username, password)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            t0 = time.monotonic()
            infos = []
            for i, (topic, payload) in enumerate(self.messages):
                infos.append(self.c.publish(topic, payload, qos=self.qos))
                if i % 100 == 99:
                    ahead = (i + 1) / self.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)  # the publisher's pacing (input), not a wait
            for info in infos:
                info.wait_for_publish(60)
        except BaseException as e:  # surfaced by join_ok()
            self.error = e

    def join_ok(self, timeout: float = 120) -> None:
        self.join(timeout)
        self.c.disconnect()
        self.c.loop_stop()
        assert not self.is_alive(), "publisher did not finish"
        if self.error:
            raise self.error


def publish_now(b: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    pub = Publisher(b, messages)
    pub.start()
    pub.join_ok()


def config(tmp_path: Path, b: Mosquitto, keyfile: Path, broker: dict | None = None, **sections):  # noqa: ANN003, ANN201
    """:func:`tests.helpers.edge.make_config` with extra ``broker:`` settings."""
    path = make_config(tmp_path, b, keyfile, **sections)
    if broker:
        data = yaml.safe_load(path.read_text())
        data["broker"].update(broker)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def started(edge: Callable[[Path], EdgeProcess], cfg: Path) -> EdgeProcess:
    """Start ``edgepipe run`` and wait until the broker acknowledged its subscription."""
    proc = edge(cfg)
    proc.wait_subscribed()
    return proc


def drain(b: Mosquitto, proc: EdgeProcess, seq: int, timeout: float = 30) -> None:
    """Publish the marker ``seq_message(seq)`` and wait until ``proc`` has acknowledged it.

    Anything the broker still held for edgepipe's session (a redelivery, a late duplicate)
    is queued before the marker, so once the marker is acked everything before it has been
    processed: what the store holds then is final."""
    before = proc.metric("edgepipe_messages_acked_total")
    publish_now(b, [seq_message(seq)])
    proc.wait_metric("edgepipe_messages_acked_total", before + 1, timeout)
