"""Sync benchmark: bytes on the wire per reading, backlog drain rate, CPU per reading.

    python -m bench.sync [--readings 250000] [--no-postgres] [--out bench/results/sync.json]

1. Wire size: the UCI air-quality data (121,641 readings, 13 metrics) as the sensors send it
   (one JSON message per reading, ``{"ts":..,"value":..,"seq":..}`` on
   ``sensors/{device}/{metric}``) against edgepipe's upload (columnar msgpack batches of
   500 readings, 16 batches per request) with no compression, gzip and zstd; the signed
   HTTP request head is counted too.
2. Drain: a backlog of ``--readings`` readings (the data set, repeated) in a real encrypted
   store, drained by the sync worker over loopback to a real ``edgepipe-cloud serve``
   process (SQLite, and PostgreSQL if reachable).  Edge CPU is this process's CPU time
   during the drain (it does nothing else); receiver CPU is the uvicorn process's
   utime+stime from /proc/PID/stat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from devtools import _dataset as dataset

REPO = Path(__file__).resolve().parents[1]
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
BATCH = 500  # readings per committed batch (pipeline default batch.max_messages)
PER_REQUEST = 16


def load_readings(path: Path = dataset.FULL) -> list[tuple[str, int, float]]:
    """(metric, ts_ms, value) in file order, row by row."""
    return [
        (m, ts, v)
        for ts, values in dataset.read_rows(path)
        for m, v in zip(dataset.METRICS, values, strict=True)
    ]


# -- 1. bytes on the wire ----------------------------------------------------------------------
def wire_sizes(readings: list[tuple[str, int, float]], device: str = "aq-1") -> dict[str, Any]:
    from core._model import Batch, SeriesRegistry
    from protocol._signing import CONTENT_TYPE, signed_headers
    from sync._worker import encode_batch, encode_request

    n = len(readings)
    json_payload = 0
    topics = 0
    for i, (m, ts, v) in enumerate(readings):
        json_payload += len(json.dumps({"ts": ts // 1000, "value": v, "seq": i}).encode())
        topics += len(f"sensors/{device}/{m}")
    # MQTT 3.1.1 QoS 1 PUBLISH: fixed header (2 bytes, 3 above 127), topic length (2), packet id (2)
    mqtt_overhead = sum(
        (2 if len(f"sensors/{device}/{m}") + 4 + 40 < 128 else 3) + 4 for m, _, _ in readings
    )
    registry = SeriesRegistry()
    blobs = []
    for start in range(0, n, BATCH):
        b = Batch([], [], [], [])
        for m, ts, v in readings[start : start + BATCH]:
            b.append(ts, v, registry.intern(device, m), 1 if v == -200 else 0)
        blobs.append(encode_batch(len(blobs) + 1, b, registry))
    status = {
        "backlog_batches": 0,
        "backlog_readings": 0,
        "oldest_unsynced_ms": None,
        "dead_letters": 0,
        "link": "wifi",
    }
    secret = os.urandom(32)
    out: dict[str, Any] = {
        "readings": n,
        "json_payload_bytes_per_reading": json_payload / n,
        "json_topic_plus_payload_bytes_per_reading": (json_payload + topics) / n,
        "mqtt_publish_bytes_per_reading": (json_payload + topics + mqtt_overhead) / n,
        "batch_readings": BATCH,
        "batches_per_request": PER_REQUEST,
    }
    for comp in ("none", "gzip", "zstd"):
        body_total = head_total = 0
        t0 = time.process_time()
        for i in range(0, len(blobs), PER_REQUEST):
            body, enc = encode_request(device, blobs[i : i + PER_REQUEST], status, comp)
            body_total += len(body)
            h = signed_headers(secret, device, "/v1/batches", body, timestamp=int(time.time()))
            h.update(
                {
                    "Content-Type": CONTENT_TYPE,
                    "Content-Encoding": enc,
                    "Content-Length": str(len(body)),
                    "Host": "receiver.example:8443",
                    "Accept-Encoding": "identity",
                }
            )
            head_total += len("POST /v1/batches HTTP/1.1\r\n") + 2
            head_total += sum(len(f"{k}: {v}\r\n") for k, v in h.items())
        cpu = time.process_time() - t0
        out[comp] = {
            "body_bytes_per_reading": body_total / n,
            "with_http_head_bytes_per_reading": (body_total + head_total) / n,
            "vs_json_payload": (body_total + head_total) / json_payload,
            "compress_cpu_us_per_reading": cpu / n * 1e6,
        }
    return out


# -- 2. drain over loopback --------------------------------------------------------------------
def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _make_store(path: Path, keyfile: Path, readings, total: int, device: str):
    from config._models import Secret
    from core._model import Batch
    from storage import Keyring, Store

    store = await Store.open(
        path, Keyring.from_secret(Secret(file=keyfile)), device_id=device, synchronous="NORMAL"
    )
    sids = {m: store.registry.intern(device, m) for m in {r[0] for r in readings}}
    made, k, lap = 0, 0, 0
    span = readings[-1][1] - readings[0][1] + 3600_000
    while made < total:
        b = Batch([], [], [], [])
        for _ in range(min(BATCH, total - made)):
            m, ts, v = readings[k]
            b.append(ts + lap * span, v, sids[m], 1 if v == -200 else 0)
            k += 1
            if k == len(readings):
                k, lap = 0, lap + 1
        await store.commit(b)
        made += len(b)
    return store


async def _drain(store, url: str, secret: str, device: str, compression: str) -> int:
    from config._models import SyncConfig
    from pipeline._compose import make_sync_worker

    cfg = SyncConfig(
        url=url,
        device_secret=secret,
        compression=compression,
        batches_per_request=PER_REQUEST,
        links={"sysfs_root": "/nonexistent"},  # link kind "unknown": always up
    )
    w = make_sync_worker(
        cfg, store, device_id=device, secret=secret, base_dir=Path(store.path).parent
    )
    try:
        return await w.drain()
    finally:
        w.close()


def drain_run(
    db_url: str, readings, total: int, compression: str, workdir: Path, store_path: Path
) -> dict[str, Any]:
    device = f"bench-{uuid.uuid4().hex[:8]}"
    keyfile = workdir / "store.key"
    if not keyfile.exists():
        from storage import generate_key_line

        keyfile.write_text(generate_key_line() + "\n")
        keyfile.chmod(0o600)
    store_path.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(store_path) + suffix).unlink(missing_ok=True)
    from cloud._local import LocalReceiver

    rcv = LocalReceiver(db_url, log=workdir / "receiver.log", cwd=REPO)
    secret = rcv.add_device(device)

    async def go() -> dict[str, Any]:
        store = await _make_store(store_path, keyfile, readings, total, device)
        try:
            with rcv:
                r0, e0, t0 = _proc_cpu_s(rcv.pid), time.process_time(), time.perf_counter()
                sent = await _drain(store, rcv.url, secret, device, compression)
                wall = time.perf_counter() - t0
                e1, r1 = time.process_time(), _proc_cpu_s(rcv.pid)
        finally:
            await store.close()
        assert sent == total, (sent, total)
        return {
            "backend": db_url.split(":", 1)[0],
            "compression": compression,
            "readings": total,
            "seconds": wall,
            "readings_per_s": total / wall,
            "edge_cpu_us_per_reading": (e1 - e0) / total * 1e6,
            "receiver_cpu_us_per_reading": (r1 - r0) / total * 1e6,
        }

    return asyncio.run(go())


def _pg_ok() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_DSN, connect_timeout=2).close()
        return True
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__.split("\n")[0])
    ap.add_argument("--readings", type=int, default=250_000, help="backlog size to drain")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sync.json")
    args = ap.parse_args(argv)

    readings = load_readings()
    wire = wire_sizes(readings)
    print(f"bytes on the wire per reading ({wire['readings']:,} UCI air-quality readings)")
    print(f"  JSON payload as sensors send it      {wire['json_payload_bytes_per_reading']:7.2f}")
    print(
        f"  + MQTT topic                          {wire['json_topic_plus_payload_bytes_per_reading']:7.2f}"
    )
    print(f"  + MQTT PUBLISH framing (QoS 1)        {wire['mqtt_publish_bytes_per_reading']:7.2f}")
    print(f"  {'upload':<10} {'body':>8} {'+HTTP head':>11} {'vs JSON':>8} {'CPU us':>7}")
    for comp in ("none", "gzip", "zstd"):
        w = wire[comp]
        print(
            f"  {comp:<10} {w['body_bytes_per_reading']:8.2f} "
            f"{w['with_http_head_bytes_per_reading']:11.2f} {w['vs_json_payload']:8.1%} "
            f"{w['compress_cpu_us_per_reading']:7.2f}"
        )

    runs = []
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-sync-") as d:
        work = Path(d)
        plans = [(f"sqlite:///{work}/cloud-{c}.db", c) for c in ("zstd", "gzip", "none")]
        schema = None
        if not args.no_postgres and _pg_ok():
            schema = f"bench_sync_{uuid.uuid4().hex[:8]}"
            plans.append((f"{PG_DSN}?schema={schema}", "zstd"))
        try:
            for db, comp in plans:
                r = drain_run(db, readings, args.readings, comp, work, work / "store.db")
                runs.append(r)
        finally:
            if schema is not None:
                import psycopg

                with psycopg.connect(PG_DSN, autocommit=True) as c:
                    c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    print(
        f"\nbacklog drain over loopback ({args.readings:,} readings, {BATCH}/batch, "
        f"{PER_REQUEST} batches/request)"
    )
    print(
        f"  {'backend':<10} {'comp':<5} {'readings/s':>11} {'edge CPU us':>12} {'recv CPU us':>12}"
    )
    for r in runs:
        print(
            f"  {r['backend']:<10} {r['compression']:<5} {r['readings_per_s']:11,.0f} "
            f"{r['edge_cpu_us_per_reading']:12.2f} {r['receiver_cpu_us_per_reading']:12.2f}"
        )
    result = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "wire": wire,
        "drain": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nwritten to {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
