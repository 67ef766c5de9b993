"""The benchmarks' raw-socket publishers deliver every reading, once, as a paho publisher
would: a real broker, a real subscriber, the messages counted and decoded.

The throughput and drain figures in docs/performance.md rest on this load; a publisher
that lost, repeated or garbled messages would make every rate wrong."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench._load import _RAW_WINDOW, run_publishers
from devtools._mosquitto import Mosquitto


@pytest.mark.parametrize("qos", [1, 0])
def test_raw_publishers_deliver_every_reading_once(tmp_path: Path, qos: int) -> None:
    # more than the in-flight window, so the publisher has to wait for PUBACKs and the
    # packet ids wrap within one connection
    n = 2 * _RAW_WINDOW + 70_000 if qos else 5000
    seen: dict[int, tuple[str, dict]] = {}
    dups: list[int] = []
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        doc = json.loads(m.payload)
        if doc["seq"] in seen:
            dups.append(doc["seq"])
        seen[doc["seq"]] = (m.topic, doc)
        if len(seen) == n:
            done.set()

    with Mosquitto(workdir=tmp_path / "broker") as b:
        sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="count")
        sub.on_message = on_message
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.connect(b.host, b.port)
        sub.subscribe("bench/+/+", qos=1)
        sub.loop_start()
        try:
            assert subscribed.wait(10)
            run_publishers(b.host, b.port, n, procs=2, qos=qos, raw=True)
            # QoS 1: the publishers returned after every PUBACK, so the broker has queued
            # them all for the subscriber (max_queued_messages is far above n)
            assert done.wait(120), f"{len(seen)} of {n} arrived"
        finally:
            sub.loop_stop()
            sub.disconnect()
    assert not dups
    assert sorted(seen) == list(range(n))
    topic, doc = seen[1234]
    assert topic == "bench/dev4/m2"
    assert doc["value"] == 1234 * 0.25 and isinstance(doc["ts"], float)
