"""Ingest throughput of the cloud receiver, per backend.

Starts ``edgepipe-cloud serve`` in a child process on a free loopback port, uploads signed,
zstd-compressed requests from a few client threads, and reports readings/s, request latency
and CPU per reading of the receiver process (and of the PostgreSQL server processes for the
PostgreSQL backend), read from /proc.

    python -m bench.receiver                       # both backends
    python -m bench.receiver --backend sqlite --requests 400 --batch 1000
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import msgpack
import psycopg
import zstandard

from protocol import _signing

REPO = Path(__file__).resolve().parents[1]
PG = "postgresql://postgres@127.0.0.1:5432/test"
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _postgres_cpu_s() -> float:
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "postgres":
                    continue
            total += _cpu_s(int(pid))
        except OSError:
            continue
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _bodies(device: str, requests: int, batches: int, per_batch: int) -> list[bytes]:
    cctx = zstandard.ZstdCompressor(level=3)
    out, seq, t0 = [], 0, 1_700_000_000_000
    for _ in range(requests):
        blobs = []
        for _ in range(batches):
            seq += 1
            n = per_batch
            blobs.append(
                msgpack.packb(
                    {
                        "seq": seq,
                        "series": [["sensor-1", "temp", None], ["sensor-2", "hum", {"room": "a"}]],
                        "sid": [i & 1 for i in range(n)],
                        "ts": [t0 + seq * n + i for i in range(n)],
                        "val": [20.0 + (i % 100) / 10 for i in range(n)],
                        "flags": [0] * n,
                    }
                )
            )
        status = {
            "backlog_batches": 0,
            "backlog_readings": 0,
            "oldest_unsynced_ms": None,
            "dead_letters": 0,
            "link": "ethernet",
        }
        top = {"v": 1, "device": device, "status": status, "batches": blobs}
        out.append(cctx.compress(msgpack.packb(top)))
    return out


def run(backend: str, requests: int, batches: int, per_batch: int, clients: int) -> dict:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    tmp = tempfile.TemporaryDirectory()
    db = f"sqlite:///{tmp.name}/cloud.db" if backend == "sqlite" else f"{PG}?schema={schema}"
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "EDGEPIPE_CLOUD_DB": db,
        "EDGEPIPE_CLOUD_MASTER_KEY_FILE": f"{tmp.name}/master.key",
    }
    _cli(env, "master-key", "generate", "--out", f"{tmp.name}/master.key")
    _cli(env, "init")
    secret = bytes.fromhex(_cli(env, "devices", "add", "bench-1"))
    bodies = _bodies("bench-1", requests, batches, per_batch)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloud.cli",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--max-body-mb",
            "64",
        ],
        env=env,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/v1/ping")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        latencies: list[float] = []
        lock = threading.Lock()
        queue = list(enumerate(bodies))

        def worker() -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                while True:
                    with lock:
                        if not queue:
                            return
                        _, body = queue.pop(0)
                    h = _signing.signed_headers(
                        secret,
                        "bench-1",
                        "/v1/batches",
                        body,
                        timestamp=int(time.time()),
                        link="ethernet",
                    )
                    h["Content-Type"] = _signing.CONTENT_TYPE
                    h["Content-Encoding"] = "zstd"
                    t = time.perf_counter()
                    r = http.post("/v1/batches", content=body, headers=h)
                    dt = time.perf_counter() - t
                    if r.status_code != 200:
                        raise RuntimeError(f"upload failed: {r.status_code} {r.text}")
                    with lock:
                        latencies.append(dt)

        cpu0, pg0, t0 = _cpu_s(proc.pid), _postgres_cpu_s(), time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        cpu, pg = _cpu_s(proc.pid) - cpu0, _postgres_cpu_s() - pg0
        readings = requests * batches * per_batch
        if len(latencies) != requests:
            raise RuntimeError("some uploads failed")
        latencies.sort()
        return {
            "backend": backend,
            "readings": readings,
            "readings_per_s": readings / wall,
            "requests_per_s": requests / wall,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
            "receiver_cpu_us_per_reading": cpu / readings * 1e6,
            "postgres_cpu_us_per_reading": pg / readings * 1e6 if backend == "postgres" else None,
            "request_bytes": sum(map(len, bodies)) // requests,
        }
    finally:
        proc.terminate()
        proc.wait(30)
        tmp.cleanup()
        if backend == "postgres":
            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--batches", type=int, default=10, help="batches per request")
    p.add_argument("--batch", type=int, default=500, help="readings per batch")
    p.add_argument("--clients", type=int, default=2, help="concurrent uploading clients")
    a = p.parse_args(argv)
    for backend in ["sqlite", "postgres"] if a.backend == "both" else [a.backend]:
        r = run(backend, a.requests, a.batches, a.batch, a.clients)
        pg = r["postgres_cpu_us_per_reading"]
        print(
            f"{backend:8s} {r['readings']:>9,d} readings  {r['readings_per_s']:>10,.0f} readings/s  "
            f"{r['requests_per_s']:6.1f} req/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
            f"receiver CPU {r['receiver_cpu_us_per_reading']:.2f} us/reading"
            + (f"  postgres CPU {pg:.2f} us/reading" if pg is not None else "")
            + f"  ({r['request_bytes']:,d} B/request)"
        )


if __name__ == "__main__":
    main()
