"""Load generation for the benchmarks: publisher processes that are not the bottleneck.

``run_publishers(host, port, total, procs=2, qos=1, rate=None, ca=None)`` starts ``procs``
separate processes, each publishing its share of ``total`` JSON readings ({"seq", "value",
"ts"}) on ``bench/<device>/<metric>`` as fast as the broker takes them (in-flight window
1000), or paced at ``rate`` messages/s in all.  Each payload carries its publish time as
``ts`` (epoch seconds with microseconds), so a consumer can compute publish-to-commit
latency.  With ``ca`` (the PEM of the CA that signed the broker's certificate) they connect
over TLS.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

__all__ = ["TOPIC", "run_publishers", "start_publishers"]

TOPIC = "bench/{device}/{metric}"


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
        payload = json.dumps({"seq": seq, "value": seq * 0.25, "ts": round(time.time(), 6)})
        infos.append(c.publish(f"bench/dev{seq % 10}/m{seq % 4}", payload, qos=qos))
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
) -> tuple[list[Any], Any]:
    """Start the publisher processes; returns (processes, result queue)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    per = total // procs
    start_at = time.time() + delay
    ps = []
    for k in range(procs):
        count = per if k < procs - 1 else total - per * (procs - 1)
        p = ctx.Process(
            target=_publisher,
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
