"""At-least-once without duplicates, on a real mosquitto and real edgepipe processes.

Every message carries a unique ``seq`` that becomes the reading's value, so the store can be
checked for *exactly* the published set: nothing missing, nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml
from conftest import free_port, make_config, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from devtools._mosquitto import Mosquitto
from storage import Keyring, Store


# -- helpers shared by the test_mqtt_* files ---------------------------------------------
async def _contents(db: Path, keyfile: Path) -> tuple[list[float], list]:
    store = await Store.open(db, Keyring.from_file(keyfile), device_id="test-device")
    try:
        values = []
        for sb in await store.batches():
            values.extend(sb.batch.value)
        return values, await store.dead_letters()
    finally:
        await store.close()


def stored_values(db: Path, keyfile: Path) -> list[float]:
    """The value of every stored reading (the tests publish value == seq)."""
    if not db.exists():
        return []
    return asyncio.run(_contents(db, keyfile))[0]


def dead_letters(db: Path, keyfile: Path) -> list:
    return asyncio.run(_contents(db, keyfile))[1] if db.exists() else []


def seq_message(seq: int, device: str = "d1") -> tuple[str, bytes]:
    body = {"seq": seq, "value": seq, "ts": 1_700_000_000_000 + seq}
    return f"sensors/{device}/temp", json.dumps(body).encode()


def assert_exactly(values: list[float], n: int) -> None:
    counts = Counter(int(v) for v in values)
    dupes = sorted(s for s, c in counts.items() if c > 1)
    missing = sorted(set(range(n)) - set(counts))
    assert not dupes, f"{len(dupes)} duplicated readings, e.g. {dupes[:10]}"
    assert not missing, f"{len(missing)} missing readings, e.g. {missing[:10]}"
    assert len(values) == n


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
                        time.sleep(ahead)
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


def metric(port: int, name: str) -> float:
    """The sum of a metric's samples from an edgepipe's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(float(x.split()[-1]) for x in lines if x.startswith(name) and " " in x)


def config(tmp_path: Path, b: Mosquitto, keyfile: Path, broker: dict | None = None, **sections):  # noqa: ANN003, ANN201
    """:func:`conftest.make_config` with extra ``broker:`` settings."""
    path = make_config(tmp_path, b, keyfile, **sections)
    if broker:
        data = yaml.safe_load(path.read_text())
        data["broker"].update(broker)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def started(edge, cfg: Path):  # noqa: ANN001, ANN201
    proc = edge(cfg)
    n = proc.output().count("subscribed to")
    wait_for(lambda: proc.output().count("subscribed to") > n or not proc.alive(), 20, "subscribe")
    assert proc.alive(), proc.output()
    return proc


# -- tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_kill9_repeatedly_stores_every_message_exactly_once(
    tmp_path, broker, keyfile, edge, protocol
):
    n = 8000
    rng = random.Random(4)
    cfg = config(
        tmp_path,
        broker,
        keyfile,
        broker={
            "protocol": protocol,
            "client_id": f"edgepipe-kill9-{protocol}",
        },
    )
    db = tmp_path / "store.db"
    proc = started(edge, cfg)
    pub = Publisher(broker, [seq_message(i) for i in range(n)], rate=2500)
    pub.start()
    kills = 0
    for _ in range(5):
        time.sleep(rng.uniform(0.2, 0.9))
        proc.kill9()
        kills += 1
        proc = started(edge, cfg)
    pub.join_ok()
    wait_for(lambda: len(stored_values(db, keyfile)) >= n, 60, "all readings stored")
    time.sleep(0.5)  # anything late would be a duplicate
    assert proc.terminate() == 0
    assert kills == 5
    assert_exactly(stored_values(db, keyfile), n)


def test_crash_between_commit_and_ack_is_stored_once(tmp_path, broker, keyfile, edge, monkeypatch):
    n = 1000
    cfg = make_config(tmp_path, broker, keyfile, batch={"max_messages": 100, "max_delay_ms": 5})
    db = tmp_path / "store.db"
    monkeypatch.setenv("EDGEPIPE_FAULT", "crash_after_commit:3")
    proc = started(edge, cfg)
    monkeypatch.delenv("EDGEPIPE_FAULT")
    pub = Publisher(broker, [seq_message(i) for i in range(n)], rate=5000)
    pub.start()
    wait_for(lambda: not proc.alive(), 30, "the fault hook to crash edgepipe")
    assert proc.proc.returncode == 137
    assert "EDGEPIPE_FAULT" in proc.output()
    committed = stored_values(db, keyfile)
    assert 0 < len(committed) < n  # three batches committed, none acknowledged
    port = free_port()
    cfg = config(
        tmp_path,
        broker,
        keyfile,
        metrics={"listen": f"127.0.0.1:{port}"},
        batch={"max_messages": 100, "max_delay_ms": 5},
    )
    proc = started(edge, cfg)
    pub.join_ok()
    wait_for(lambda: len(stored_values(db, keyfile)) >= n, 30, "all readings stored")
    time.sleep(0.5)
    skipped = metric(port, "edgepipe_redeliveries_skipped_total")
    assert proc.terminate() == 0
    assert_exactly(stored_values(db, keyfile), n)
    # the committed-but-unacknowledged messages came back and were recognised as stored
    assert skipped >= 1


def test_broker_restart_mid_stream_loses_and_duplicates_nothing(
    tmp_path, keyfile, edge, monkeypatch
):
    n = 6000
    with Mosquitto() as b:
        cfg = config(
            tmp_path,
            b,
            keyfile,
            broker={
                "client_id": "edgepipe-broker-restart",
                "reconnect_min_s": 0.1,
                "reconnect_max_s": 1.0,
            },
            batch={"max_messages": 200, "max_delay_ms": 5},
        )
        db = tmp_path / "store.db"
        # a store slower than the publisher, so the restart lands in the middle of a backlog
        monkeypatch.setenv("EDGEPIPE_FAULT", "slow_commit:40")
        proc = started(edge, cfg)
        monkeypatch.delenv("EDGEPIPE_FAULT")
        first = Publisher(b, [seq_message(i) for i in range(n // 2)], rate=20000)
        first.start()
        first.join_ok()
        assert len(stored_values(db, keyfile)) < n // 2  # still working through the backlog
        b.restart()
        second = Publisher(b, [seq_message(i) for i in range(n // 2, n)], rate=20000)
        second.start()
        second.join_ok()
        wait_for(lambda: len(stored_values(db, keyfile)) >= n, 60, "all readings stored")
        time.sleep(0.5)
        assert proc.alive()
        out = proc.output()
        assert proc.terminate() == 0
        assert out.count("connected to") >= 2, out
        assert "session present: True" in out, out
        assert_exactly(stored_values(db, keyfile), n)


def test_redelivery_window_catches_a_resend_without_dup(tmp_path, broker, keyfile, edge):
    """A broker restored from its save file may resend an already committed message as a
    first delivery (no DUP).  Right after a connect edgepipe checks every message against
    the store; after the window, a byte-identical message is a genuine repeat and kept."""
    cfg = config(
        tmp_path, broker, keyfile, broker={"client_id": "edgepipe-window", "redelivery_window_s": 2}
    )
    db = tmp_path / "store.db"
    same = seq_message(1)
    proc = started(edge, cfg)
    time.sleep(2.2)  # past this connection's window: a plain first delivery
    publish_now(broker, [same, seq_message(2)])
    wait_for(lambda: len(stored_values(db, keyfile)) >= 2, 20, "first readings")
    assert proc.terminate() == 0

    proc = started(edge, cfg)  # a new connection: its window is open
    publish_now(broker, [same, seq_message(3)])  # `same` without DUP, as after a restore
    wait_for(lambda: len(stored_values(db, keyfile)) >= 3, 20, "seq 3")
    time.sleep(2.2)  # the window closes
    publish_now(broker, [same, seq_message(4)])  # a genuine repeat: kept
    wait_for(lambda: len(stored_values(db, keyfile)) >= 5, 20, "seq 4 and the repeat")
    time.sleep(0.3)
    assert proc.terminate() == 0
    assert sorted(stored_values(db, keyfile)) == [1.0, 1.0, 2.0, 3.0, 4.0]
