"""Load generation for the benchmarks: publisher processes that are not the bottleneck.

``run_publishers(host, port, total, procs=2, qos=1, rate=None, ca=None, raw=False)`` starts
``procs`` separate processes, each publishing its share of ``total`` JSON readings ({"seq",
"value", "ts"}) on ``bench/<device>/<metric>`` as fast as the broker takes them (in-flight
window 1000), or paced at ``rate`` messages/s in all.  Each payload carries its publish
time as ``ts`` (epoch seconds with microseconds), so a consumer can compute
publish-to-commit latency.  With ``ca`` (the PEM of the CA that signed the broker's
certificate) they connect over TLS.

A paho publisher tops out at ~5-7k QoS 1 msg/s a process here (its Python per message:
the packet built, the in-flight bookkeeping, the PUBACK's callback), below what the edge
process consumes.  ``raw=True`` runs :func:`_raw_publisher` instead: MQTT 3.1.1 written
on the socket directly, every PUBLISH encoded before the start and sent in chunks of
``_RAW_CHUNK`` packets, up to ``_RAW_WINDOW`` unacknowledged, the PUBACKs only counted --
a load that the broker, not the publisher, bounds (``ts`` is then the time the payload
was encoded, so ``raw`` is for throughput, not latency; ``rate`` does not apply).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import ssl
import time
from pathlib import Path
from typing import Any

__all__ = ["TOPIC", "run_publishers", "start_publishers"]

TOPIC = "bench/{device}/{metric}"
_RAW_CHUNK = 256  # PUBLISH packets per send
_RAW_WINDOW = 8192  # unacknowledged PUBLISH packets at most (packet ids stay unique)


def _payload(seq: int, ts: float) -> tuple[str, bytes]:
    topic = f"bench/dev{seq % 10}/m{seq % 4}"
    return topic, json.dumps({"seq": seq, "value": seq * 0.25, "ts": round(ts, 6)}).encode()


def _packet(first: int, body: bytes) -> bytes:
    """An MQTT control packet: the first byte, the remaining length, the body."""
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(length) + body


def _raw_publisher(
    host: str,
    port: int,
    first: int,
    count: int,
    qos: int,
    rate: float | None,
    start_at: float,
    out: Any,
    ca: str | None = None,
) -> None:
    sock: socket.socket = socket.create_connection((host, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ca is not None:
        sock = ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname=host)
    cid = f"bench-raw-{first}".encode()
    # CONNECT, MQTT 3.1.1, clean session, no keep-alive (the stream itself is the traffic)
    sock.sendall(_packet(0x10, b"\x00\x04MQTT\x04\x02\x00\x00" + len(cid).to_bytes(2, "big") + cid))
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        if not chunk:
            raise ConnectionError("the broker closed the connection before CONNACK")
        connack += chunk
    if connack[0] != 0x20 or connack[3] != 0:
        raise ConnectionError(f"CONNACK refused: {connack!r}")
    flags = 0x30 | (qos << 1)
    ts = time.time()
    packets = []
    for i in range(count):
        seq = first + i
        topic, payload = _payload(seq, ts)
        t = topic.encode()
        pid = (seq % 65535 + 1).to_bytes(2, "big") if qos else b""
        packets.append(_packet(flags, len(t).to_bytes(2, "big") + t + pid + payload))
    chunks = [b"".join(packets[i : i + _RAW_CHUNK]) for i in range(0, count, _RAW_CHUNK)]
    del packets
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    t0 = time.perf_counter()
    acked_bytes = 0  # every PUBACK is 4 bytes; nothing else comes to a publisher
    for k, chunk in enumerate(chunks):
        sock.sendall(chunk)
        sent = min(count, (k + 1) * _RAW_CHUNK)
        while qos and sent - acked_bytes // 4 > (_RAW_WINDOW if sent < count else 0):
            got = sock.recv(65536)
            if not got:
                raise ConnectionError("the broker closed the connection")
            acked_bytes += len(got)
    out.put((first, count, time.perf_counter() - t0))
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()


def _publisher(
    host: str,
    port: int,
    first: int,
    count: int,
    qos: int,
    rate: float | None,
    start_at: float,
    out: Any,
    ca: str | None = None,
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{first}"
    )
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    if ca is not None:
        c.tls_set(ca_certs=ca)
    c.connect(host, port, keepalive=60)
    c.loop_start()
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    t0 = time.perf_counter()
    infos = []
    for i in range(count):
        seq = first + i
        if rate:
            target = t0 + i / rate
            while True:
                d = target - time.perf_counter()
                if d <= 0:
                    break
                time.sleep(min(d, 0.002))
        topic, payload = _payload(seq, time.time())
        infos.append(c.publish(topic, payload, qos=qos))
        if len(infos) >= 5000:
            infos[0].wait_for_publish(60)
            infos = infos[-1000:]
    for info in infos:
        info.wait_for_publish(60)
    out.put((first, count, time.perf_counter() - t0))
    c.disconnect()
    c.loop_stop()


def start_publishers(
    host: str,
    port: int,
    total: int,
    *,
    procs: int = 2,
    qos: int = 1,
    rate: float | None = None,
    delay: float = 0.5,
    ca: Path | None = None,
    raw: bool = False,
) -> tuple[list[Any], Any]:
    """Start the publisher processes; returns (processes, result queue)."""
    if raw and rate:
        raise ValueError("raw publishers send as fast as the broker takes them: no rate")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    per = total // procs
    start_at = time.time() + delay
    ps = []
    for k in range(procs):
        count = per if k < procs - 1 else total - per * (procs - 1)
        p = ctx.Process(
            target=_raw_publisher if raw else _publisher,
            args=(
                host,
                port,
                k * per,
                count,
                qos,
                rate / procs if rate else None,
                start_at,
                q,
                str(ca) if ca else None,
            ),
            daemon=True,
        )
        p.start()
        ps.append(p)
    return ps, q


def run_publishers(host: str, port: int, total: int, **kw: Any) -> float:
    """Publish ``total`` messages; returns the slowest publisher's elapsed seconds."""
    ps, q = start_publishers(host, port, total, **kw)
    results = [q.get(timeout=600) for _ in ps]
    for p in ps:
        p.join(30)
    return max(r[2] for r in results)
