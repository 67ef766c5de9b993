"""Connection features against real mosquitto brokers: mutual TLS, password auth, Last
Will and retained status, MQTT 5 shared subscriptions, Receive Maximum, backpressure."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from config._models import BrokerConfig
from devtools._mosquitto import Mosquitto
from pipeline.ingest._mqtt import MQTTClient
from tests.helpers.edge import free_port, wait_for
from tests.helpers.mqtt import Publisher, config, seq_message, started
from tests.helpers.pki import TestCA
from tests.helpers.store import assert_exactly, stored_values


# -- certificates ------------------------------------------------------------------------
def _write_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    ca = TestCA(d)
    server_crt, server_key = ca.issue("server")
    client_crt, client_key = ca.issue("client", cn="edgepipe-device", client=True)
    return {
        "ca_crt": ca.path,
        "server_crt": server_crt,
        "server_key": server_key,
        "client_crt": client_crt,
        "client_key": client_key,
    }


def _listeners(pki: dict[str, Path], plain: int, tls: int) -> str:
    """mosquitto configuration: a plain listener and a TLS one with the server certificate."""
    return (
        f"listener {plain} 127.0.0.1\n"
        f"listener {tls} 127.0.0.1\n"
        f"cafile {pki['ca_crt']}\ncertfile {pki['server_crt']}\nkeyfile {pki['server_key']}\n"
    )


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


# -- TLS ---------------------------------------------------------------------------------
def test_mutual_tls(tmp_path, keyfile, edge):
    pki = _write_pki(tmp_path)
    plain, tls = free_port(), free_port()
    extra = _listeners(pki, plain, tls) + (
        "require_certificate true\nuse_identity_as_username true\n"
    )
    with Mosquitto(port=plain, extra=extra) as b:
        tls_cfg = {
            "port": tls,
            "client_id": "edgepipe-tls",
            "tls": {
                "ca_file": str(pki["ca_crt"]),
                "cert_file": str(pki["client_crt"]),
                "key_file": str(pki["client_key"]),
            },
        }
        proc = started(edge, config(tmp_path, b, keyfile, broker=tls_cfg))
        assert proc.readyz() == (200, "ready")
        assert proc.metric("edgepipe_mqtt_connects_total") == 1
        pub = Publisher(b, [seq_message(i) for i in range(300)])
        pub.start()
        pub.join_ok()
        db = tmp_path / "store.db"
        wait_for(lambda: len(stored_values(db, keyfile)) >= 300, 30, "readings over TLS")
        assert proc.terminate() == 0
        assert_exactly(stored_values(db, keyfile), 300)

        # without a client certificate the broker refuses the handshake: edgepipe keeps
        # retrying (and says why) instead of crashing
        no_cert = dict(tls_cfg, client_id="edgepipe-tls-2", tls={"ca_file": str(pki["ca_crt"])})
        sub = tmp_path / "nocert"
        sub.mkdir()
        proc2 = edge(config(sub, b, keyfile, broker=no_cert))
        proc2.wait_metric("edgepipe_mqtt_connect_failures_total", 2, timeout=60)  # a retry
        # the log line saying why is the operator-facing feature under test
        assert "cannot connect to MQTT broker" in proc2.output(), proc2.output()
        assert proc2.alive()
        assert proc2.readyz() == (503, "not ready: not connected to the MQTT broker")
        assert proc2.metric("edgepipe_mqtt_connects_total") == 0


@pytest.mark.timeout(120)
def test_tls_backlog_is_read_in_bursts(tmp_path):
    # mosquitto writes every packet as a TLS record of its own and an SSL socket returns
    # one record per recv: a backlog must still be read many packets per wake of the
    # reader (as over plain TCP), not one event-loop pass per message
    pki = _write_pki(tmp_path)
    plain, tls = free_port(), free_port()
    extra = _listeners(pki, plain, tls)
    msgs = [(f"burst/{i % 7}", seq_message(i)[1]) for i in range(900)]
    cfg = BrokerConfig(
        host="127.0.0.1",
        port=tls,
        client_id="edgepipe-tls-burst",
        status_topic=None,
        tls={"ca_file": str(pki["ca_crt"])},
    )

    async def subscribe() -> None:  # a persistent session that holds the subscription
        async with MQTTClient(cfg, [("burst/#", 1)], device_id="b") as m:
            await m.wait_subscribed(10)

    async def drain() -> tuple[list, int]:
        got: list = []
        async with MQTTClient(cfg, [("burst/#", 1)], device_id="b") as m:
            await m.wait_connected(10)
            deadline = time.monotonic() + 30
            while len(got) < len(msgs) and time.monotonic() < deadline:
                try:
                    batch = await asyncio.wait_for(m.get_batch(1000, 0), 1)
                except TimeoutError:
                    continue
                m.ack(batch)
                got += batch
            return got, m.stats["reader_wakes"]

    with Mosquitto(port=plain, extra=extra) as b:
        asyncio.run(subscribe())
        pub = Publisher(b, msgs)  # queued by the broker while edgepipe is offline
        pub.start()
        pub.join_ok()
        got, wakes = asyncio.run(drain())
    assert len(got) == len(msgs)
    assert [(g.topic, g.payload) for g in got] == msgs
    # the 900 queued messages (~80 KB) go out at once on reconnect: a handful of 64 KiB
    # reads, against 900 wakes when each wake read a single TLS record
    assert wakes <= len(msgs) // 10, wakes


# -- username / password ----------------------------------------------------------------
def _password_file(path: Path, user: str, password: str) -> None:
    """A mosquitto password file: by mosquitto_passwd when installed, else in its format
    (``user:$7$ITERATIONS$SALT$HASH``, PBKDF2-HMAC-SHA512, base64; mosquitto 2.0)."""
    tool = shutil.which("mosquitto_passwd")
    if tool is not None:
        subprocess.run([tool, "-c", "-b", str(path), user, password], check=True)
        return
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    b64 = base64.b64encode
    path.write_text(f"{user}:$7$101${b64(salt).decode()}${b64(digest).decode()}\n")


def test_password_auth_from_env_and_file(tmp_path, keyfile, edge, monkeypatch):
    pwfile = tmp_path / "passwd"
    _password_file(pwfile, "edge", "s3cret pass")
    with Mosquitto(anonymous=False, extra=f"password_file {pwfile}\n") as b:
        monkeypatch.setenv("TEST_MQTT_PASSWORD", "s3cret pass")
        secret = tmp_path / "mqtt-password"
        secret.write_text("s3cret pass\n")
        for i, password in enumerate(({"env": "TEST_MQTT_PASSWORD"}, {"file": str(secret)})):
            d = tmp_path / f"run{i}"
            d.mkdir()
            creds = {"client_id": f"edgepipe-auth-{i}", "username": "edge", "password": password}
            proc = started(edge, config(d, b, keyfile, broker=creds))
            pub = Publisher(
                b, [seq_message(s) for s in range(100)], username="edge", password="s3cret pass"
            )
            pub.start()
            pub.join_ok()
            db = d / "store.db"
            wait_for(lambda db=db: len(stored_values(db, keyfile)) >= 100, 30, "readings")
            assert proc.terminate() == 0
            assert_exactly(stored_values(db, keyfile), 100)

        d = tmp_path / "wrong"
        d.mkdir()
        bad = {"client_id": "edgepipe-auth-bad", "username": "edge", "password": "nope"}
        proc = edge(config(d, b, keyfile, broker=bad))
        proc.wait_metric("edgepipe_mqtt_connect_failures_total", 2, timeout=60)
        assert proc.alive()  # keeps retrying with backoff
        # what the operator reads: the refusal, and never the password
        assert "refused" in proc.output(), proc.output()
        assert proc.metric("edgepipe_mqtt_connects_total") == 0
        assert "nope" not in proc.output()


# -- Last Will and retained status ------------------------------------------------------
class _Watcher:
    """Records every message on one topic (retained ones included)."""

    def __init__(self, b: Mosquitto, topic: str) -> None:
        self.seen: list[bytes] = []
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.c.on_message = lambda c, u, m: self.seen.append(m.payload)
        self.c.connect(b.host, b.port)
        self.c.subscribe(topic, 1)
        self.c.loop_start()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_last_will_announces_offline_after_kill9(tmp_path, broker, keyfile, edge):
    cfg = config(tmp_path, broker, keyfile, broker={"client_id": "edgepipe-will"})
    watcher = _Watcher(broker, "edgepipe/test-device/status")
    try:
        proc = started(edge, cfg)
        wait_for(lambda: watcher.seen[-1:] == [b"online"], 10, "retained online status")
        proc.kill9()
        wait_for(lambda: watcher.seen[-1:] == [b"offline"], 10, "the Last Will")
        proc = started(edge, cfg)
        wait_for(lambda: watcher.seen[-1:] == [b"online"], 10, "online again")
        assert proc.terminate() == 0
        wait_for(lambda: watcher.seen[-1:] == [b"offline"], 10, "offline on clean exit")
    finally:
        watcher.close()
    # retained: a late subscriber learns the state at once
    late = _Watcher(broker, "edgepipe/test-device/status")
    try:
        wait_for(lambda: late.seen == [b"offline"], 10, "retained offline")
    finally:
        late.close()


# -- shared subscriptions ---------------------------------------------------------------
def test_shared_subscription_splits_the_stream_without_loss(tmp_path, broker, keyfile, edge):
    n = 4000
    procs, dbs = [], []
    for i in range(2):
        d = tmp_path / f"edge{i}"
        d.mkdir()
        cfg = config(
            d,
            broker,
            keyfile,
            broker={"client_id": f"edgepipe-shared-{i}"},
            subscriptions=[{"topic": "$share/edgepipe/sensors/{device}/{metric}", "qos": 1}],
        )
        procs.append(started(edge, cfg))  # its subscription is in place
        dbs.append(d / "store.db")
    pub = Publisher(broker, [seq_message(i, device=f"d{i % 7}") for i in range(n)], rate=8000)
    pub.start()
    pub.join_ok()
    total = lambda: sum(len(stored_values(db, keyfile)) for db in dbs)  # noqa: E731
    wait_for(lambda: total() >= n, 30, "all readings stored by the group")
    acked = lambda: sum(p.metric("edgepipe_messages_acked_total") for p in procs)  # noqa: E731
    wait_for(lambda: acked() >= n, 30, "every message acknowledged by the group")
    assert acked() == n  # none delivered twice
    for p in procs:
        assert p.terminate() == 0
    parts = [stored_values(db, keyfile) for db in dbs]
    assert all(len(p) > 0 for p in parts), [len(p) for p in parts]  # both got a share
    assert_exactly(parts[0] + parts[1], n)


# -- Receive Maximum ---------------------------------------------------------------------
async def _take(m: MQTTClient, n: int, timeout: float = 30) -> list:
    """The next ``n`` messages (the deadline only bounds a failure)."""
    out: list = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out += await m.get_batch(n - len(out), 0)
    return out


async def _before_marker(m: MQTTClient, broker: Mosquitto, timeout: float = 30) -> list:
    """Every QoS 1 message the broker sends before a QoS 0 marker published now.

    Receive Maximum bounds only QoS 1 and 2 messages in flight: the broker sends a QoS 0
    message at once, after whatever QoS 1 messages it was willing to send, so the marker
    shows positively that the broker holds the rest back."""
    pub = Publisher(broker, [("rm/marker", b"m")], qos=0)
    pub.start()
    await asyncio.to_thread(pub.join_ok)  # off the loop: it must keep reading
    out: list = []
    async with asyncio.timeout(timeout):
        while True:
            batch = await m.get_batch(1000, 0)
            out += [x for x in batch if x.qos == 1]
            if any(x.topic == "rm/marker" for x in batch):
                return out


@pytest.mark.timeout(60)
def test_broker_respects_receive_maximum(broker):
    """With Receive Maximum 5 and nothing acknowledged, mosquitto sends exactly 5 QoS 1
    messages and then waits; acknowledgements let more through, in order."""

    async def scenario() -> None:
        cfg = BrokerConfig(
            host=broker.host,
            port=broker.port,
            receive_maximum=5,
            client_id="recvmax",
            status_topic=None,
        )
        async with MQTTClient(cfg, [("rm/#", 1)], device_id="rm") as m:
            await m.wait_subscribed(10)  # SUBACK: messages from now on are ours
            pub = Publisher(broker, [("rm/x", b"%d" % i) for i in range(40)])
            pub.start()
            await asyncio.to_thread(pub.join_ok)  # the broker holds all 40 now
            got = await _before_marker(m, broker)
            assert len(got) == 5, len(got)
            m.ack(got[:2])
            more = await _take(m, 2)
            more += await _before_marker(m, broker)
            # mosquitto 2.0 refills more generously than the window once acks flow (see
            # docs/broker.md), but it sends again only after acknowledgements
            assert len(got) + len(more) < 40, len(more)
            m.ack(got[2:] + more)
            rest: list = []
            async with asyncio.timeout(30):
                while len(got) + len(more) + len(rest) < 40:
                    batch = await m.get_batch(1000, 0)
                    rest += [x for x in batch if x.qos == 1]
                    m.ack(batch)
            assert [int(x.payload) for x in got + more + rest] == list(range(40))

    asyncio.run(scenario())


# -- backpressure ------------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_slow_store_stops_reading_the_socket_rss_bounded_nothing_lost(
    tmp_path, broker, keyfile, edge, monkeypatch
):
    n1 = 2000
    port = free_port()
    cfg = config(
        tmp_path,
        broker,
        keyfile,
        broker={"client_id": "edgepipe-backpressure"},
        batch={"max_messages": 200, "max_delay_ms": 5, "max_pending": 1000},
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    monkeypatch.setenv("EDGEPIPE_FAULT", "slow_commit:100")  # the store falls behind
    proc = started(edge, cfg)
    monkeypatch.delenv("EDGEPIPE_FAULT")
    base = _rss_kb(proc.proc.pid)
    pad = "x" * 4000
    flood = [
        (f"sensors/flood{i % 3}/temp", b'{"value": -1, "tags": {"p": "%s"}}' % pad.encode())
        for i in range(20_000)
    ]  # 80 MB of QoS 0 if it were all buffered
    q0 = Publisher(broker, flood, rate=100_000, qos=0, client_id="flood")
    q1 = Publisher(broker, [seq_message(i) for i in range(n1)], rate=100_000)
    q0.start()
    q1.start()
    peak = base
    while q0.is_alive() or q1.is_alive():
        peak = max(peak, _rss_kb(proc.proc.pid))
        time.sleep(0.05)  # RSS sampling interval while the publishers run, not a wait
    q0.join_ok()
    q1.join_ok()
    db = tmp_path / "store.db"

    def qos1_done() -> bool:
        nonlocal peak
        peak = max(peak, _rss_kb(proc.proc.pid))
        return sum(1 for v in stored_values(db, keyfile) if v >= 0) >= n1

    wait_for(qos1_done, 90, "every QoS 1 reading stored")
    metrics = _scrape(port)
    assert proc.terminate() == 0
    assert "edgepipe_mqtt_reader_pauses_total" in metrics
    pauses = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("edgepipe_mqtt_reader_pauses_total")
    )
    assert pauses >= 1  # edgepipe stopped reading instead of buffering
    assert peak - base < 40_000, f"RSS grew by {(peak - base) / 1024:.0f} MB"
    assert_exactly([v for v in stored_values(db, keyfile) if v >= 0], n1)


# -- lost sessions -----------------------------------------------------------------------
def test_a_lost_session_is_reported(tmp_path, keyfile, edge):
    """A broker without persistence forgets edgepipe's session on restart: edgepipe says so
    on the reconnect, and on the first connect of a new process whose store has data."""
    lost = "broker has no session"
    with Mosquitto(persistence=False) as b:
        cfg = config(
            tmp_path,
            b,
            keyfile,
            broker={"client_id": "edgepipe-lost", "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
        )
        proc = started(edge, cfg)
        assert proc.metric("edgepipe_mqtt_sessions_lost_total") == 0  # nothing to lose yet
        pub = Publisher(b, [seq_message(i) for i in range(50)])
        pub.start()
        pub.join_ok()
        db = tmp_path / "store.db"
        wait_for(lambda: len(stored_values(db, keyfile)) >= 50, 20, "readings stored")
        b.restart()
        proc.wait_metric("edgepipe_mqtt_sessions_lost_total", 1, 20)
        assert lost in proc.output()  # the warning is what the operator reads
        # resubscribed: the new session receives again
        proc.wait_subscribed(count=2)
        pub = Publisher(b, [seq_message(i) for i in range(50, 80)])
        pub.start()
        pub.join_ok()
        wait_for(lambda: len(stored_values(db, keyfile)) >= 80, 20, "readings after resubscribe")
        assert proc.terminate() == 0
        b.restart()
        proc = started(edge, cfg)
        assert proc.metric("edgepipe_mqtt_sessions_lost_total") == 1
        assert lost in proc.output()
        assert proc.terminate() == 0


def test_password_file_written_without_mosquitto_passwd(tmp_path, monkeypatch):
    """The fallback writer produces a file mosquitto accepts (and rejects wrong passwords)."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    pwfile = tmp_path / "passwd"
    _password_file(pwfile, "edge", "pa55 word")
    with Mosquitto(anonymous=False, extra=f"password_file {pwfile}\n") as b:
        for password, expect in (("pa55 word", "Success"), ("wrong", "Not authorized")):
            codes: list[str] = []
            c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
            c.username_pw_set("edge", password)
            c.on_connect = lambda c, u, f, rc, p, codes=codes: codes.append(str(rc))
            c.connect(b.host, b.port)
            c.loop_start()
            try:
                wait_for(lambda codes=codes: codes, 10, "CONNACK")
            finally:
                c.disconnect()
                c.loop_stop()
            assert codes == [expect]


def test_reconnects_with_jittered_backoff_until_the_broker_appears(tmp_path, keyfile, edge):
    port = free_port()
    b = Mosquitto(port=port)
    cfg = config(
        tmp_path,
        b,
        keyfile,
        broker={"client_id": "edgepipe-late", "reconnect_min_s": 0.05, "reconnect_max_s": 0.4},
    )
    proc = edge(cfg)
    failures = proc.wait_metric("edgepipe_mqtt_connect_failures_total", 6, timeout=60)
    # The retry message is what the operator reads while the broker is away: each failed
    # attempt is logged (before it is counted) with the delay before the next one, and the
    # delays are visible nowhere else.
    waits = [
        float(line.rsplit("retrying in ", 1)[1].rstrip("s"))
        for line in proc.output().splitlines()
        if "cannot connect to MQTT broker" in line and "retrying in" in line
    ]
    assert len(waits) >= failures, proc.output()
    assert all(0 <= w <= 0.4 for w in waits), waits  # full jitter below the cap
    assert len(set(waits)) > 1  # jittered, not a fixed interval
    with b:
        proc.wait_subscribed()
        pub = Publisher(b, [seq_message(i) for i in range(20)])
        pub.start()
        pub.join_ok()
        db = tmp_path / "store.db"
        wait_for(lambda: len(stored_values(db, keyfile)) >= 20, 20, "readings")
        assert proc.terminate() == 0
    assert_exactly(stored_values(db, keyfile), 20)
