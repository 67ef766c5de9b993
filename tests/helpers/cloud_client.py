"""A tiny device-side client of the sync wire protocol v1 for the receiver's tests, and a
real uvicorn server on a free loopback port.

It is written from docs/sync-protocol.md, independently of the edge worker, and signs with
``protocol._signing`` (the module both sides share).
"""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgpack
import psycopg
import uvicorn
import zstandard

from protocol import _signing
from tests.helpers.edge import wait_for

PG_DSN = os.environ.get("EDGEPIPE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PATH = "/v1/batches"
TOKEN = "operator-token-for-tests"  # the receiver contract's operator token
MAX_BODY = 256 * 1024  # ... and its body limits
MAX_DECOMPRESSED = 2 * 1024 * 1024

Reading = tuple[
    str, str, dict[str, str] | None, int, float, int
]  # source, metric, tags, ts, val, flags


def make_batch(seq: int, readings: Sequence[Reading]) -> bytes:
    """One batch's msgpack bytes (columnar, with a batch-local series table)."""
    series: list[list[Any]] = []
    index: dict[tuple, int] = {}
    sid, ts, val, flags = [], [], [], []
    for source, metric, tags, t, v, f in readings:
        key = (source, metric, tuple(sorted((tags or {}).items())))
        if key not in index:
            index[key] = len(series)
            series.append([source, metric, tags])
        sid.append(index[key])
        ts.append(t)
        val.append(v)
        flags.append(f)
    return msgpack.packb(
        {"seq": seq, "series": series, "sid": sid, "ts": ts, "val": val, "flags": flags}
    )


def series_readings(
    n: int, *, start: int = 1_700_000_000_000, metric: str = "temp"
) -> list[Reading]:
    return [("sensor-1", metric, None, start + i * 1000, float(i), 0) for i in range(n)]


def encode(body: bytes, encoding: str) -> bytes:
    if encoding == "zstd":
        return zstandard.ZstdCompressor().compress(body)
    if encoding == "gzip":
        return gzip.compress(body)
    return body


class DeviceClient:
    """Signs, compresses and posts uploads as device ``name``."""

    def __init__(
        self, base_url: str, name: str, secret: bytes, encoding: str = "zstd", version: int = 2
    ) -> None:
        self.base_url, self.name, self.secret, self.encoding = base_url, name, secret, encoding
        self.version = version  # of the signature: 2 (current devices) or 1 (older ones)
        self.http = httpx.Client(base_url=base_url, timeout=30)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def body(
        self,
        batches: Sequence[bytes],
        *,
        status: dict[str, Any] | None = None,
        dead_letters: list[dict[str, Any]] | None = None,
        device: str | None = None,
        health: bytes | None = None,
        logs: list[dict[str, Any]] | None = None,
    ) -> bytes:
        """The upload's msgpack bytes; ``health`` a block of snapshots (as
        ``sync._health.encode_health`` makes it), ``logs`` log records (docs/health.md)."""
        top: dict[str, Any] = {
            "v": 1,
            "device": device or self.name,
            "status": status
            or {
                "backlog_batches": 0,
                "backlog_readings": 0,
                "oldest_unsynced_ms": None,
                "dead_letters": 0,
                "link": "wifi",
            },
            "batches": list(batches),
        }
        if dead_letters is not None:
            top["dead_letters"] = dead_letters
        if health is not None:  # a health block (docs/sync-protocol.md)
            top["health"] = health
        if logs is not None:
            top["logs"] = logs
        return msgpack.packb(top, use_bin_type=True)

    def post_raw(
        self,
        sent: bytes,
        *,
        encoding: str | None = None,
        timestamp: int | None = None,
        nonce: str | None = None,
        secret: bytes | None = None,
        signed_body: bytes | None = None,
        link: str = "wifi",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Post ``sent`` as is (already encoded); the signature covers ``signed_body`` if
        given (to forge), else ``sent``."""
        ts = int(time.time()) if timestamp is None else timestamp
        signed = sent if signed_body is None else signed_body
        if self.version == 2:
            h = _signing.signed_headers_v2(
                secret or self.secret,
                self.name,
                PATH,
                signed,
                timestamp=ts,
                encoding=encoding or self.encoding,
                nonce=nonce,
                link=link,
            )
        else:
            h = _signing.signed_headers(
                secret or self.secret, self.name, PATH, signed, timestamp=ts, nonce=nonce, link=link
            )
            h["Content-Type"] = _signing.CONTENT_TYPE
            h["Content-Encoding"] = encoding or self.encoding
        h.update(headers or {})
        return self.http.post(PATH, content=sent, headers=h)

    def upload(self, batches: Sequence[bytes], **kw: Any) -> httpx.Response:
        post_kw = {k: kw.pop(k) for k in list(kw) if k in ("timestamp", "nonce", "secret", "link")}
        return self.post_raw(encode(self.body(batches, **kw), self.encoding), **post_kw)


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), 20, "uvicorn")
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


def wait_serving(
    proc: subprocess.Popen[Any], url: str, log: Path, *, verify: Any = True, timeout: float = 30
) -> httpx.Response:
    """Wait until ``edgepipe-cloud serve`` (``proc``, writing ``log``) answers
    ``GET {url}/v1/ping`` with 200; fails with its log if it exits or never answers."""

    def answered() -> httpx.Response | None:
        assert proc.poll() is None, f"the receiver exited:\n{log.read_text()}"
        try:
            r = httpx.get(url + "/v1/ping", verify=verify)
        except httpx.TransportError:
            return None
        return r if r.status_code == 200 else None

    try:
        return wait_for(answered, timeout, f"{url}/v1/ping")  # type: ignore[return-value]
    except AssertionError as e:
        raise AssertionError(f"{e}\n{log.read_text()}") from None


@contextmanager
def pg_schema_url() -> Iterator[str]:
    """A PostgreSQL URL whose tables live in a fresh schema, dropped afterwards."""
    schema = f"test_cloud_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{PG_DSN}?schema={schema}"
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def new_master_key(*lines: str) -> Any:
    """A master key of ``lines`` (key lines), or of one fresh key."""
    from cloud import MasterKey
    from cloud._secrets import generate_master_key_line

    return MasterKey.parse("\n".join(lines or [generate_master_key_line()]), "test key")


@contextmanager
def open_test_backend(kind: str, tmp: Path) -> Iterator[Any]:
    """A fresh receiver backend with a master key of its own: ``kind`` "sqlite" (a file in
    ``tmp``) or "postgres" (a schema of its own, dropped afterwards)."""
    from cloud import open_backend

    if kind == "sqlite":
        with open_backend(f"sqlite:///{tmp / 'cloud.db'}", master_key=new_master_key()) as b:
            yield b
    else:
        with pg_schema_url() as url, open_backend(url, master_key=new_master_key()) as b:
            yield b


def new_device(backend: Any, prefix: str = "dev") -> tuple[str, bytes]:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    secret = os.urandom(32)
    backend.add_device(name, secret)
    return name, secret


def last_rejection(operator: httpx.Client, device: str | None = None) -> dict:
    """The newest row of the receiver's rejection log (of ``device``), via the read API."""
    params = {"limit": 1} | ({"device": device} if device else {})
    rows = operator.get("/v1/rejections", params=params).json()["rejections"]
    return rows[0]


# -- device health (docs/health.md) -----------------------------------------------------
def health_snapshots(
    now: int, *, fill: float, restart_at: int = 20
) -> list[tuple[int, dict[str, Any]]]:
    """30 snapshots a minute apart ending now: CPU 1.5 % of a core, a trap every minute,
    the store filling to ``fill`` of its quota, and a restart (counters from zero) at
    snapshot ``restart_at``, with a new chain."""
    out = []
    quota = 100 << 20
    for i in range(30):
        k = i if i < restart_at else i - restart_at  # minutes since the process started
        snap = {
            "ts": now - (29 - i) * 60_000,
            "cpu_ms": 900 * k,
            "rss_kb": 30_000 + 10 * i,
            "store_used_b": int(quota * fill * (i + 1) / 30),
            "store_quota_b": quota,
            "link_bytes:wifi": 2000 * (i + 1),
            "traps:scale:unreachable": k,
            "drops:validity:out_of_range": 2 * k,
            "dead_letters:scale:unreachable": k,
            "sessions_lost": 0,
            "clock_skew_ms": 400,
            "chain": "aaaa1111" if i < restart_at else "bbbb2222",
        }
        out.append((i + 1, snap))
    return out


def upload_as(rx: Any, name: str, **kw: Any) -> None:
    """Register ``name`` on a receiver (:class:`cloud._local.LocalReceiver`) and upload
    ``kw`` (``health``, ``logs``, ``status`` ...) as it, with no readings."""
    secret = bytes.fromhex(rx.add_device(name))
    dev = DeviceClient(rx.url, name, secret)
    try:
        r = dev.upload([], **kw)
        assert r.status_code == 200, r.text
    finally:
        dev.close()


def log_record(seq: int, ts: int, level: str, msg: str, n: int = 1) -> dict[str, Any]:
    return {"seq": seq, "ts": ts, "last": ts, "level": level, "logger": "edgepipe.chain",
            "msg": msg, "n": n}  # fmt: skip
