"""Ingest throughput of the cloud receiver, per backend.

Starts ``edgepipe-cloud serve`` in a child process on a free loopback port, uploads signed,
zstd-compressed requests from a few client threads, and reports readings/s, request latency
and CPU per reading of the receiver process (and of the PostgreSQL server processes for the
PostgreSQL backend), read from /proc.

    python -m bench.receiver                       # both backends
    python -m bench.receiver --backend sqlite --requests 400 --batch 1000

With ``--logins N`` it measures instead what a storm of sign-ins costs genuine uploads: 50
uploads (1 batch of 500 readings each, one every 100 ms, from 4 devices) on a quiet
receiver, then 50 more while a separate process sends waves of N concurrent wrong-password
sign-ins (for one user from one address per wave, or ``--spread``: each for another user
from another loopback address); it prints the uploads' median and max latency in both
phases, the sign-ins' answers and the receiver's password checks.

    python -m bench.receiver --logins 100
    python -m bench.receiver --logins 100 --spread
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


@contextmanager
def _receiver(
    backend: str, devices: list[str], env_extra: dict[str, str] | None = None
) -> Iterator[tuple[str, dict[str, bytes], int, dict[str, str]]]:
    """``edgepipe-cloud serve`` in a child process on a free loopback port, with ``devices``
    registered: (url, secrets by device, receiver pid, env)."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    tmp = tempfile.TemporaryDirectory()
    db = f"sqlite:///{tmp.name}/cloud.db" if backend == "sqlite" else f"{PG}?schema={schema}"
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "EDGEPIPE_CLOUD_DB": db,
        "EDGEPIPE_CLOUD_MASTER_KEY_FILE": f"{tmp.name}/master.key",
        **(env_extra or {}),
    }
    _cli(env, "master-key", "generate", "--out", f"{tmp.name}/master.key")
    _cli(env, "init")
    secrets = {d: bytes.fromhex(_cli(env, "devices", "add", d)) for d in devices}
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
        yield url, secrets, proc.pid, env
    finally:
        proc.terminate()
        proc.wait(30)
        tmp.cleanup()
        if backend == "postgres":
            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _signed(secret: bytes, device: str, body: bytes) -> dict[str, str]:
    """The headers of a genuine upload of ``body`` (zstd) as current devices sign it (v2)."""
    return _signing.signed_headers_v2(
        secret,
        device,
        "/v1/batches",
        body,
        timestamp=int(time.time()),
        encoding="zstd",
        link="ethernet",
    )


def run(backend: str, requests: int, batches: int, per_batch: int, clients: int) -> dict:
    bodies = _bodies("bench-1", requests, batches, per_batch)
    with _receiver(backend, ["bench-1"]) as (url, secrets, pid, _):
        secret = secrets["bench-1"]
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
                    h = _signed(secret, "bench-1", body)
                    t = time.perf_counter()
                    r = http.post("/v1/batches", content=body, headers=h)
                    dt = time.perf_counter() - t
                    if r.status_code != 200:
                        raise RuntimeError(f"upload failed: {r.status_code} {r.text}")
                    with lock:
                        latencies.append(dt)

        cpu0, pg0, t0 = _cpu_s(pid), _postgres_cpu_s(), time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        cpu, pg = _cpu_s(pid) - cpu0, _postgres_cpu_s() - pg0
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


# -- uploads during a login storm ----------------------------------------------------------
async def _login(host: str, port: int, source: str, user: str) -> int:
    """One sign-in attempt with a wrong password from ``source`` (a loopback address); the
    answer's status (0: the connection failed).  An attacker needs no form page: the CSRF
    check is a double submit, so any token sent as both cookie and field passes it."""
    token = uuid.uuid4().hex
    form = f"username={user}&password=wrong+guess+{token[:6]}&csrf={token}".encode()
    head = (
        f"POST /login HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(form)}\r\nCookie: ep_csrf={token}\r\nConnection: close\r\n\r\n"
    )
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        writer.write(head.encode() + form)
        await writer.drain()
        status = await reader.readline()
        await reader.read()  # to the end: the server closes
        writer.close()
        return int(status.split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _storm_process(url: str, per_wave: int, spread: bool, stop: Any, started: Any, out: Any):
    """Waves of ``per_wave`` concurrent sign-ins, back to back until ``stop`` is set.

    Not spread: each wave is ``per_wave`` logins for one user from one address (a new user
    and address each wave, so every wave again costs the limiter's allowance of password
    checks).  Spread: every login of a wave is for another user from another address, so
    the per-user and per-address limits allow them all and only the password pool's bound
    stands in the way."""
    host, port = url.removeprefix("http://").split(":")

    async def storm() -> tuple[Counter[int], int]:
        codes: Counter[int] = Counter()
        wave = 0
        while not stop.is_set():
            b, c = divmod(wave, 250)
            if spread:
                logins = [
                    _login(host, int(port), f"127.{b + 1}.{c}.{i + 1}", f"op-{wave}-{i}")
                    for i in range(per_wave)
                ]
            else:
                src, user = f"127.{b + 1}.{c}.1", f"op-{wave}"
                logins = [_login(host, int(port), src, user) for _ in range(per_wave)]
            started.set()
            codes.update(await asyncio.gather(*logins))
            wave += 1
        return codes, wave

    codes, waves = asyncio.run(storm())
    out.put((dict(codes), waves))


def _upload_latencies(
    url: str, secrets: dict[str, bytes], bodies: dict[str, list[bytes]], n: int, every_s: float
) -> list[float]:
    """``n`` genuine uploads, one every ``every_s`` seconds, round-robin over the devices;
    their latencies (each must be answered 200)."""
    out: list[float] = []
    devices = sorted(secrets)
    with httpx.Client(base_url=url, timeout=60) as http:
        t_next = time.perf_counter()
        for i in range(n):
            device = devices[i % len(devices)]
            body = bodies[device].pop(0)
            h = _signed(secrets[device], device, body)
            t = time.perf_counter()
            r = http.post("/v1/batches", content=body, headers=h)
            out.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"upload failed: {r.status_code} {r.text}")
            t_next += every_s
            time.sleep(max(0.0, t_next - time.perf_counter()))
    return out


def run_logins(
    uploads: int, per_wave: int, spread: bool, every_s: float = 0.1, devices: int = 4
) -> dict:
    """Genuine uploads (1 batch of 500 readings, one every ``every_s``) without and then
    during a storm of sign-ins; the uploads' latencies and the receiver's password checks."""
    names = [f"bench-{i}" for i in range(devices)]
    per_device = 2 * uploads // devices + 2
    bodies = {d: _bodies(d, per_device, 1, 500) for d in names}
    token = uuid.uuid4().hex
    with _receiver("sqlite", names, {"EDGEPIPE_CLOUD_API_TOKEN": token}) as (url, secrets, pid, _):
        _upload_latencies(url, secrets, bodies, devices, every_s)  # warm up every path
        quiet = _upload_latencies(url, secrets, bodies, uploads, every_s)
        ctx = mp.get_context("spawn")
        stop, started, out = ctx.Event(), ctx.Event(), ctx.Queue()
        storm = ctx.Process(target=_storm_process, args=(url, per_wave, spread, stop, started, out))
        cpu0 = _cpu_s(pid)
        storm.start()
        try:
            if not started.wait(60):
                raise RuntimeError("the login storm did not start")
            during = _upload_latencies(url, secrets, bodies, uploads, every_s)
        finally:
            stop.set()
            codes, waves = out.get(timeout=120)
            storm.join(60)
        cpu = _cpu_s(pid) - cpu0
        status = httpx.get(
            url + "/v1/receiver", headers={"Authorization": f"Bearer {token}"}
        ).json()
    return {
        "quiet_ms": [x * 1000 for x in quiet],
        "storm_ms": [x * 1000 for x in during],
        "login_codes": codes,
        "waves": waves,
        "logins": status["logins"],
        "receiver_cpu_s": cpu,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--batches", type=int, default=10, help="batches per request")
    p.add_argument("--batch", type=int, default=500, help="readings per batch")
    p.add_argument("--clients", type=int, default=2, help="concurrent uploading clients")
    p.add_argument(
        "--logins",
        type=int,
        metavar="N",
        help="instead: genuine uploads without and during waves of N concurrent sign-ins",
    )
    p.add_argument(
        "--spread",
        action="store_true",
        help="with --logins: each sign-in for another user from another address",
    )
    p.add_argument("--uploads", type=int, default=50, help="with --logins: uploads per phase")
    a = p.parse_args(argv)
    if a.logins:
        r = run_logins(a.uploads, a.logins, a.spread)
        for phase in ("quiet", "storm"):
            ms = r[f"{phase}_ms"]
            print(
                f"uploads {phase:5s} n={len(ms)}  median {statistics.median(ms):7.1f} ms  "
                f"max {max(ms):7.1f} ms"
            )
        q, st = statistics.median(r["quiet_ms"]), statistics.median(r["storm_ms"])
        print(f"storm/quiet median ratio {st / q:.2f}")
        print(
            f"{r['waves']} waves of {a.logins} sign-ins ({'spread' if a.spread else 'one user'}):"
            f" answers {dict(sorted(r['login_codes'].items()))}; receiver: {r['logins']};"
            f" receiver CPU during the storm {r['receiver_cpu_s']:.1f} s"
        )
        return
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
