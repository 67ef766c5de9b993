"""The embedded MQTT broker against real paho-mqtt 2.x clients, MQTT 3.1.1 and 5."""

from __future__ import annotations

import queue
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from devtools._minibroker import MiniBroker
from tests.helpers.edge import make_config, publish, reading_msg, wait_for
from tests.helpers.store import stored


@pytest.fixture
def mini() -> Iterator[MiniBroker]:
    with MiniBroker() as b:
        yield b


@pytest.fixture(params=["3.1.1", "5"])
def version(request: pytest.FixtureRequest) -> str:
    return request.param


class Client:
    """A paho client on its own network thread that records what it receives."""

    def __init__(
        self,
        broker: MiniBroker,
        client_id: str,
        version: str,
        *,
        persistent: bool = False,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        will: tuple[str, bytes] | None = None,
        start_loop: bool = True,
    ) -> None:
        self.v5 = version == "5"
        self.broker, self.persistent = broker, persistent
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connacks: queue.Queue[bool] = queue.Queue()
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else not persistent,
            manual_ack=manual_ack,
        )
        self.receive_maximum = receive_maximum
        if will:
            self.c.will_set(*will, qos=1)
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_connect = lambda c, u, f, rc, p: self.connacks.put(bool(f.session_present))
        self.c.max_inflight_messages_set(1000)
        self.disconnects: queue.Queue[object] = queue.Queue()
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)
        self.start_loop = start_loop
        self.present = self.connect()

    def connect(self) -> bool:
        """Connect; returns the session-present flag."""
        kw: dict[str, object] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300 if self.persistent else 0
            if self.receive_maximum:
                props.ReceiveMaximum = self.receive_maximum
            kw = {"clean_start": not self.persistent, "properties": props}
        self.c.connect(self.broker.host, self.broker.port, keepalive=30, **kw)
        if self.start_loop:
            self.c.loop_start()
        else:
            while self.connacks.empty():
                self.c.loop(0.1)
        return self.connacks.get(timeout=10)

    def subscribe(self, *topics: tuple[str, object]) -> None:
        granted: queue.Queue[object] = queue.Queue()
        self.c.on_subscribe = lambda c, u, mid, codes, p: granted.put(codes)
        self.c.subscribe(list(topics))
        codes = granted.get(timeout=10)
        assert all(not rc.is_failure for rc in codes), codes  # type: ignore[attr-defined]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def take(self, n: int) -> list[mqtt.MQTTMessage]:
        return [self.messages.get(timeout=10) for _ in range(n)]

    def until(self, topic: str) -> list[mqtt.MQTTMessage]:
        """Messages received up to and including the first one on ``topic``."""
        out = []
        while True:
            m = self.messages.get(timeout=10)
            out.append(m)
            if m.topic == topic:
                return out

    def disconnect(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_pubsub_qos_and_wildcards(mini, version):
    sub = Client(mini, "sub", version)
    sub.subscribe(("a/+/c", 1), ("x/#", 0), ("#", 1))
    pub = Client(mini, "pub", version)
    pub.publish("a/b/c", b"1", qos=1)
    pub.publish("a/b/d", b"2", qos=1)
    pub.publish("x", b"3", qos=1)  # x/# matches its parent level
    pub.publish("x/y/z", b"4", qos=0)
    pub.publish("$SYS/load", b"5", qos=1)  # no wildcard at the first level matches $ topics
    pub.publish("end", b"6", qos=1)
    got = [(m.topic, m.payload, m.qos) for m in sub.until("end")]
    # one copy per message at the highest granted QoS of the matching subscriptions
    assert got == [
        ("a/b/c", b"1", 1),
        ("a/b/d", b"2", 1),
        ("x", b"3", 1),
        ("x/y/z", b"4", 0),
        ("end", b"6", 1),
    ]
    sub.disconnect()
    pub.disconnect()


@pytest.mark.parametrize("level", [4, 5])
def test_invalid_filters_are_refused_one_by_one(mini, level):
    filters = [b"a/#/b", b"ok/+", b"a+/b", b"$share/g", b"$share//x", b"$share/g/s/#"]
    body = b"\x00\x07" + (b"\x00" if level == 5 else b"")
    body += b"".join(struct.pack(">H", len(f)) + f + b"\x01" for f in filters)
    with socket.create_connection((mini.host, mini.port)) as raw:
        raw.sendall(_raw_connect(level))
        assert raw.recv(2)[0] == 0x20
        raw.recv(64)  # rest of CONNACK
        raw.sendall(bytes([0x82, len(body)]) + body)
        suback = raw.recv(64)
        failure = 0x8F if level == 5 else 0x80
        codes = list(suback[5:] if level == 5 else suback[4:])
        assert suback[:1] == b"\x90" and codes == [failure, 1, failure, failure, failure, 1]
        assert mini.sessions()["raw"].subscriptions == ("ok/+", "$share/g/s/#")


def test_mqtt5_no_local_and_retain_as_published(mini):
    c = Client(mini, "self", "5")
    c.subscribe(("n/#", SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True)))
    other = Client(mini, "other", "5")
    c.publish("n/mine", b"dropped by No Local", retain=True)
    other.publish("n/theirs", b"kept", retain=True)
    (m,) = c.take(1)
    assert (m.topic, m.retain) == ("n/theirs", True)


def test_qos2_is_downgraded_to_1(mini, version):
    sub = Client(mini, "sub", version)
    sub.subscribe(("q2", 2))
    pub = Client(mini, "pub", version)
    pub.publish("q2", b"x", qos=2)
    (m,) = sub.take(1)
    assert (m.payload, m.qos) == (b"x", 1)


def test_retained_messages(mini, version):
    pub = Client(mini, "pub", version)
    pub.publish("r/1", b"one", retain=True)
    pub.publish("r/2", b"two", retain=True)
    pub.publish("r/2", b"", retain=True)  # clears r/2
    pub.publish("r/1", b"uno", retain=True)
    sub = Client(mini, "sub", version)
    sub.subscribe(("r/#", 1))
    (m,) = sub.take(1)
    assert (m.topic, m.payload, m.retain) == ("r/1", b"uno", True)
    pub.publish("r/3", b"live", retain=True)
    (m,) = sub.take(1)
    assert (m.topic, m.payload, m.retain) == ("r/3", b"live", False)


def test_will_on_abrupt_close_not_on_disconnect(mini, version):
    watcher = Client(mini, "watcher", version)
    watcher.subscribe(("status/#", 1))
    polite = Client(mini, "polite", version, will=("status/polite", b"gone"))
    polite.disconnect()
    wait_for(lambda: "polite" not in mini.sessions(), 10, "the clean session to end")
    rude = Client(mini, "rude", version, will=("status/rude", b"gone"), start_loop=False)
    rude.c.socket().close()  # no DISCONNECT
    (m,) = watcher.take(1)
    assert (m.topic, m.payload) == ("status/rude", b"gone")


def test_mqtt5_delayed_will_is_published_when_the_session_expires(mini):
    watcher = Client(mini, "watcher", "5")
    watcher.subscribe(("status/#", 1))
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="gone", protocol=mqtt.MQTTv5
    )
    will_props = Properties(PacketTypes.WILLMESSAGE)
    will_props.WillDelayInterval = 3600
    c.will_set("status/gone", b"offline", qos=1, properties=will_props)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 1
    c.connect(mini.host, mini.port, clean_start=False, properties=props)
    while "gone" not in mini.sessions():
        c.loop(0.1)
    c.socket().close()
    # the session (1 s) ends long before the will delay (1 h): the will goes out then
    (m,) = watcher.take(1)
    assert (m.topic, m.payload) == ("status/gone", b"offline")
    assert "gone" not in mini.sessions()


def test_persistent_session_queues_while_away(mini, version):
    sub = Client(mini, "away", version, persistent=True)
    assert sub.present is False
    sub.subscribe(("q/#", 1))
    sub.disconnect()
    wait_for(lambda: not mini.sessions()["away"].connected)
    pub = Client(mini, "pub", version)
    for i in range(50):
        pub.publish(f"q/{i}", str(i).encode(), qos=1)
    pub.publish("q/zero", b"qos0 is not queued", qos=0)
    assert mini.sessions()["away"].queued == 50
    assert sub.connect() is True  # session present, no new SUBSCRIBE
    assert [m.payload for m in sub.take(50)] == [str(i).encode() for i in range(50)]
    sub.disconnect()
    # a clean session discards it
    clean = Client(mini, "away", version)
    assert clean.present is False
    assert "q/#" not in mini.sessions()["away"].subscriptions


def test_unacked_messages_redelivered_with_dup(mini, version):
    sub = Client(mini, "worker", version, persistent=True, manual_ack=True)
    sub.subscribe(("jobs/#", 1))
    pub = Client(mini, "pub", version)
    for i in range(10):
        pub.publish(f"jobs/{i}", str(i).encode())
    first = sub.take(10)
    for m in first[:4]:
        sub.c.ack(m.mid, m.qos)
    wait_for(lambda: mini.sessions()["worker"].inflight == 6, 10, "acks")
    sub.c.loop_stop()
    sub.c.socket().close()  # abrupt: nothing more is acknowledged
    wait_for(lambda: not mini.sessions()["worker"].connected)
    assert sub.connect() is True
    again = sub.take(6)
    assert [(m.mid, m.payload, m.dup) for m in again] == [
        (m.mid, m.payload, True) for m in first[4:]
    ]
    for m in again:
        sub.c.ack(m.mid, m.qos)
    wait_for(lambda: mini.sessions()["worker"].inflight == 0, 10, "acks")


def test_receive_maximum_limits_inflight(mini, version):
    limit = 5 if version == "5" else 1000  # 3.1.1 clients get the default window
    sub = Client(mini, "slow", version, manual_ack=True, receive_maximum=limit)
    sub.subscribe(("w/#", 1))
    pub = Client(mini, "pub", version)
    for i in range(limit + 7):
        pub.publish(f"w/{i}", b"x")
    wait_for(lambda: mini.sessions()["slow"].queued == 7, 10, "queue")
    assert mini.sessions()["slow"].inflight == limit
    got = sub.take(limit)
    sub.c.ack(got[0].mid, 1)
    (m,) = sub.take(1)
    assert m.topic == f"w/{limit}"


def test_session_queue_is_bounded():
    with MiniBroker(max_queued=10) as mini:
        sub = Client(mini, "away", "5", persistent=True)
        sub.subscribe(("q/#", 1))
        sub.disconnect()
        wait_for(lambda: not mini.sessions()["away"].connected)
        pub = Client(mini, "pub", "5")
        for i in range(15):
            pub.publish(f"q/{i}", str(i).encode())
        info = mini.sessions()["away"]
        assert (info.queued, info.dropped) == (10, 5)
        sub.connect()
        assert [m.payload for m in sub.take(10)] == [str(i).encode() for i in range(5, 15)]


def test_shared_subscription_round_robin(mini, version):
    a, b = Client(mini, "a", version), Client(mini, "b", version)
    everyone = Client(mini, "all", version)
    a.subscribe(("$share/g/s/#", 1))
    b.subscribe(("$share/g/s/#", 1))
    everyone.subscribe(("s/#", 1))
    pub = Client(mini, "pub", version)
    for i in range(100):
        pub.publish(f"s/{i}", str(i).encode())
    got_all = everyone.take(100)
    got_a, got_b = a.take(50), b.take(50)
    assert a.messages.empty() and b.messages.empty()
    pa, pb = {m.payload for m in got_a}, {m.payload for m in got_b}
    assert not pa & pb
    assert pa | pb == {m.payload for m in got_all} == {str(i).encode() for i in range(100)}


def _raw_connect(level: int, keepalive: int = 30, client_id: bytes = b"raw") -> bytes:
    body = b"\x00\x04MQTT" + bytes([level, 0x02]) + struct.pack(">H", keepalive)
    if level == 5:
        body += b"\x00"  # no properties
    body += struct.pack(">H", len(client_id)) + client_id
    return bytes([0x10, len(body)]) + body


def _closed(sock: socket.socket) -> bool:
    """Read until the broker closes the connection (a DISCONNECT may come first)."""
    sock.settimeout(10)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff\xff",  # reserved type, endless remaining length
        b"\x30\x04\x00\x01ax",  # PUBLISH before CONNECT
        b"\x10\x03\x00\x04M",  # truncated CONNECT
        b"\x10\x80\x80\x80\x80\x01",  # remaining length over 4 bytes
    ],
)
def test_malformed_bytes_close_only_that_connection(mini, garbage):
    sub = Client(mini, "sub", "5")
    sub.subscribe(("ok", 1))
    with socket.create_connection((mini.host, mini.port)) as raw:
        raw.sendall(garbage)
        assert _closed(raw)
    pub = Client(mini, "pub", "3.1.1")
    pub.publish("ok", b"still serving")
    (m,) = sub.take(1)
    assert m.payload == b"still serving"
    assert mini.stats["protocol_violations"] == 1


@pytest.mark.parametrize("level", [4, 5])
def test_wildcard_in_publish_topic_closes_the_connection(mini, level):
    watcher = Client(mini, "watcher", "5")
    watcher.subscribe(("#", 1))
    with socket.create_connection((mini.host, mini.port)) as raw:
        raw.sendall(_raw_connect(level))
        assert raw.recv(2)[0] == 0x20  # CONNACK
        topic = b"a/+"
        body = struct.pack(">H", len(topic)) + topic + (b"\x00" if level == 5 else b"") + b"x"
        raw.sendall(bytes([0x30, len(body)]) + body)
        assert _closed(raw)
    assert mini.stats["protocol_violations"] == 1
    Client(mini, "pub", "5").publish("done", b"")
    assert [m.topic for m in watcher.take(1)] == ["done"]


def test_keepalive_is_enforced(mini):
    with socket.create_connection((mini.host, mini.port)) as raw:
        raw.sendall(_raw_connect(4, keepalive=1))
        assert raw.recv(4) == b"\x20\x02\x00\x00"
        assert _closed(raw)  # silent for 1.5 x keep alive
    assert mini.stats["keepalive_timeouts"] == 1


def test_session_takeover(mini, version):
    first = Client(mini, "dup", version, persistent=True, start_loop=False)
    first.c.subscribe("t", 1)
    while mini.sessions()["dup"].subscriptions != ("t",):
        first.c.loop(0.1)
    second = Client(mini, "dup", version, persistent=True, start_loop=False)
    assert second.present is True
    while first.disconnects.empty():  # the broker closes the first connection
        first.c.loop(0.1)
    if version == "5":
        assert str(first.disconnects.get()) == "Session taken over"
    info = mini.sessions()["dup"]
    assert info.connected and info.subscriptions == ("t",)


def test_stop_is_idempotent_and_restart_keeps_sessions():
    mini = MiniBroker().start()
    sub = Client(mini, "keep", "3.1.1", persistent=True)
    sub.subscribe(("k", 1))
    sub.c.loop_stop()
    mini.stop()
    mini.stop()
    mini.start()
    assert mini.sessions()["keep"].subscriptions == ("k",)
    mini.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_edgepipe_end_to_end_on_minibroker(tmp_path: Path, keyfile, edge, protocol):
    with MiniBroker() as mini:
        cfg = make_config(tmp_path, mini, keyfile)
        settings = yaml.safe_load(cfg.read_text())
        settings["broker"]["protocol"] = protocol
        cfg.write_text(yaml.safe_dump(settings, sort_keys=False))
        proc = edge(cfg)
        n = 500
        proc.wait_subscribed()
        publish(mini, [reading_msg(f"dev{i % 5}", "temp", i, i * 0.5) for i in range(n)])
        db = tmp_path / "store.db"
        wait_for(
            lambda: db.exists() and len(stored(db, keyfile)) >= n,
            30,
            "all readings stored",
        )
        assert proc.terminate() == 0
        rows = stored(db, keyfile)
        assert sorted(v for *_, v in rows) == [i * 0.5 for i in range(n)]
        assert {d for d, *_ in rows} == {f"dev{i}" for i in range(5)}
        assert mini.stats["protocol_violations"] == 0
