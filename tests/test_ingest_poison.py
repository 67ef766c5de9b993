"""Bad input through a real broker: dead-lettered with topic, reason and raw bytes, counted,
acknowledged (never redelivered), while every good message around it is stored."""

from __future__ import annotations

import urllib.request

import msgpack

from tests.helpers.edge import free_port, wait_for
from tests.helpers.mqtt import Publisher, config, publish_now, seq_message, started
from tests.helpers.store import assert_exactly, dead_letters, stored_values

POISON = [
    (b"{not json", "invalid JSON"),
    (b'{"value": "warm", "ts": 1700000000}', "value is not a number"),
    (b'{"value": 1, "ts": "yesterday"}', "is not ISO 8601"),
    (b'{"value": 1, "ts": 12}', "outside 2000..2100"),
    (b'{"value": NaN}', "not finite"),
    (b"[]", "empty list"),
    (b'"just a string"', "payload is a str"),
    (b"", "empty payload"),
    (b"\xc1\xff\x00garbage", "unknown format"),
    (b"\x82\xa5value", "invalid MessagePack"),
    (msgpack.packb({"value": [1, 2]}), "value is not a number"),
    (b'{"value": 1, "tags": "nope"}', "tags must be an object"),
    (b"x" * 3000, "exceeds max_payload_bytes"),
    (b"[" * 5000 + b"]" * 5000, "exceeds max_payload_bytes"),
    (b"[" * 900 + b"]" * 900, "list must hold"),
]


def _metric_lines(port: int, name: str) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return [line for line in r.read().decode().splitlines() if line.startswith(name)]


def test_poison_messages_are_dead_lettered_once_and_good_ones_stored(
    tmp_path, broker, keyfile, edge
):
    port = free_port()
    cfg = config(
        tmp_path,
        broker,
        keyfile,
        broker={"client_id": "edgepipe-poison"},
        batch={"max_messages": 50, "max_delay_ms": 5, "max_payload_bytes": 2048},
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    proc = started(edge, cfg)
    n_good = 600
    msgs, k = [], 0
    for i in range(n_good):
        msgs.append(seq_message(i))
        if i % 40 == 7:
            payload, _ = POISON[k % len(POISON)]
            msgs.append((f"sensors/bad{k}/temp", payload))
            k += 1
    pub = Publisher(broker, msgs, rate=5000)
    pub.start()
    pub.join_ok()
    db = tmp_path / "store.db"
    wait_for(
        lambda: len(stored_values(db, keyfile)) >= n_good and len(dead_letters(db, keyfile)) >= k,
        30,
        "good readings and dead letters stored",
    )
    lines = _metric_lines(port, "edgepipe_dead_letters_total")
    assert proc.terminate() == 0
    assert_exactly(stored_values(db, keyfile), n_good)
    dead = dead_letters(db, keyfile)
    assert len(dead) == k
    by_topic = {d.topic: d for d in dead}
    for j in range(k):
        payload, reason = POISON[j % len(POISON)]
        d = by_topic[f"sensors/bad{j}/temp"]
        assert d.payload == payload  # raw bytes kept
        assert reason in d.reason, (reason, d.reason)
    counted = sum(float(line.split()[-1]) for line in lines if 'stage="ingest"' in line)
    assert counted == k
    assert any('reason="invalid JSON' in line for line in lines)

    # acknowledged: a restart redelivers none of them.  A marker published after the
    # restart comes after anything the session still held; once it is stored and acked,
    # the marker is the only message this process received.
    proc = started(edge, cfg)
    publish_now(broker, [seq_message(n_good)])
    proc.wait_metric("edgepipe_messages_acked_total", 1, 20)
    assert proc.metric("edgepipe_messages_received_total") == 1
    assert proc.metric("edgepipe_dead_letters_total") == 0
    assert proc.terminate() == 0
    assert len(dead_letters(db, keyfile)) == k
    assert_exactly(stored_values(db, keyfile), n_good + 1)


def test_packets_over_the_maximum_packet_size_never_reach_edgepipe(tmp_path, broker, keyfile, edge):
    """MQTT 5 Maximum Packet Size: the broker drops a message larger than
    broker.max_packet_kb instead of sending it; the stream around it is unaffected."""
    cfg = config(
        tmp_path,
        broker,
        keyfile,
        broker={"client_id": "edgepipe-maxpacket", "max_packet_kb": 64},
        batch={"max_payload_bytes": 1024},
    )
    proc = started(edge, cfg)
    publish_now(
        broker,
        [seq_message(0), ("sensors/big/temp", b"x" * 200_000), ("sensors/mid/temp", b"y" * 4000)]
        + [seq_message(1)],
    )
    db = tmp_path / "store.db"
    wait_for(lambda: len(stored_values(db, keyfile)) >= 2, 20, "readings around the big one")
    wait_for(lambda: len(dead_letters(db, keyfile)) >= 1, 20, "the mid-sized dead letter")
    # a marker after the stream: once it is acked, whatever the broker sent has arrived
    publish_now(broker, [seq_message(2)])
    proc.wait_metric("edgepipe_messages_acked_total", 4, 20)
    assert proc.metric("edgepipe_messages_received_total") == 4  # never the big one
    assert proc.terminate() == 0
    assert_exactly(stored_values(db, keyfile), 3)
    assert [d.topic for d in dead_letters(db, keyfile)] == ["sensors/mid/temp"]
