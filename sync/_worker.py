"""The sync worker: uploads committed batches to the cloud receiver, oldest first.

Several batches go in one request (msgpack, compressed), signed with the device secret
(see docs/sync-protocol.md).  A batch is marked synced only when the receiver lists its
sequence number as durably acknowledged; the receiver is idempotent on (device, seq), so a
retry after a lost response never duplicates readings.  While the receiver is unreachable
the worker backs off exponentially with full jitter and honours ``Retry-After``.

The HTTP client is the standard library's ``http.client``, run on a worker thread: no
extra import weight on the edge process.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgpack

from pipeline._errors import SyncError
from pipeline._metrics import METRICS
from pipeline._model import SeriesRegistry

from ._signing import CONTENT_TYPE, signed_headers

__all__ = ["SyncWorker", "SyncStatus", "encode_batch", "encode_request"]

log = logging.getLogger("edgepipe.sync")

_bytes_sent = METRICS.counter("edgepipe_sync_bytes_total", "bytes uploaded", ["link"])
_batches_synced = METRICS.counter("edgepipe_sync_batches_total", "batches acknowledged by cloud")
_readings_synced = METRICS.counter("edgepipe_readings_synced_total", "readings acknowledged")
_sync_errors = METRICS.counter("edgepipe_sync_errors_total", "failed uploads", ["kind"])

PATH = "/v1/batches"


def encode_batch(seq: int, batch: Any, registry: SeriesRegistry) -> bytes:
    """One batch in the wire format: columnar, with a series table local to the batch."""
    local: dict[int, int] = {}
    series: list[list[Any]] = []
    sid_out = []
    for sid in batch.series:
        i = local.get(sid)
        if i is None:
            key = registry.key(sid)
            i = local[sid] = len(series)
            series.append([key.device, key.metric, key.tag_dict])
        sid_out.append(i)
    return msgpack.packb(
        {
            "seq": seq,
            "series": series,
            "sid": sid_out,
            "ts": batch.ts,
            "val": batch.value,
            "flags": batch.flags,
        },
        use_bin_type=True,
    )


def encode_request(
    device: str, blobs: list[bytes], status: dict[str, Any], compression: str
) -> tuple[bytes, str]:
    body = msgpack.packb(
        {"v": 1, "device": device, "status": status, "batches": blobs}, use_bin_type=True
    )
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(body), "zstd"
    if compression == "gzip":
        return gzip.compress(body, compresslevel=6), "gzip"
    return body, "identity"


@dataclass
class SyncStatus:
    last_success_ms: int | None = None
    last_error: str | None = None
    last_error_ms: int | None = None
    bytes_today: dict[str, int] = field(default_factory=dict)
    day: str = ""
    link: str = "unknown"
    online: bool = False


class SyncWorker:
    """``await worker.run(stop_event)`` drains the store to the receiver until stopped."""

    def __init__(
        self, store: Any, cfg: Any, *, device_id: str, secret: str | None, link: str = "unknown"
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.device_id = device_id
        self._secret = _secret_bytes(secret)
        self.link = link
        self.status = SyncStatus(link=link)
        self._wake = asyncio.Event()
        u = urlsplit(cfg.url)
        if u.scheme not in ("http", "https"):
            raise SyncError(f"sync.url must be http(s), not {cfg.url!r}")
        self._https = u.scheme == "https"
        self._host = u.hostname or "127.0.0.1"
        self._port = u.port or (443 if self._https else 80)
        self._prefix = u.path.rstrip("/")
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            self._ssl = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        self._conn: http.client.HTTPConnection | None = None

    def notify(self) -> None:
        """Called after each commit: there is something new to upload."""
        self._wake.set()

    # -- the loop ---------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        delay = self.cfg.backoff_min_s
        while not stop.is_set():
            try:
                sent = await self.sync_once()
            except SyncError as e:
                self._record_error(e)
                wait = e.retry_after if e.retry_after is not None else random.uniform(0, delay)
                delay = min(delay * 2, self.cfg.backoff_max_s)
                log.warning("sync failed: %s; next try in %.1fs", e, wait)
                await _wait(stop, wait)
                continue
            delay = self.cfg.backoff_min_s
            if sent == 0:
                self._wake.clear()
                await _wait(stop, self.cfg.interval_s, self._wake)

    async def drain(self, progress: Any = None) -> int:
        """Upload until the backlog is empty; returns readings sent. Raises SyncError."""
        total = 0
        while True:
            n = await self.sync_once()
            if n == 0:
                return total
            total += n
            if progress is not None:
                progress(total)

    async def sync_once(self) -> int:
        """One request with up to ``batches_per_request`` batches; returns readings acked."""
        batches = await self.store.unsynced(limit=self.cfg.batches_per_request)
        if not batches:
            return 0
        registry = self.store.registry
        blobs, size = [], 0
        for sb in batches:
            blob = encode_batch(sb.seq, sb.batch, registry)
            if blobs and size + len(blob) > self.cfg.max_request_bytes:
                break
            blobs.append(blob)
            size += len(blob)
        batches = batches[: len(blobs)]
        stats = await self.store.stats()
        status = {
            "backlog_batches": stats["unsynced_batches"],
            "backlog_readings": stats["unsynced_readings"],
            "oldest_unsynced_ms": stats["oldest_unsynced_ms"],
            "dead_letters": stats["dead_letters"],
            "link": self.link,
        }
        body, encoding = encode_request(self.device_id, blobs, status, self.cfg.compression)
        result = await asyncio.to_thread(self._post, body, encoding)
        acked = set(result.get("acked", []))
        ok = [sb for sb in batches if sb.seq in acked]
        await self.store.mark_synced(sb.seq for sb in ok)
        n = sum(len(sb.batch) for sb in ok)
        _batches_synced.inc(len(ok))
        _readings_synced.inc(n)
        self._count_bytes(len(body))
        self.status.last_success_ms = int(time.time() * 1000)
        self.status.online = True
        if not ok:
            raise SyncError("receiver acknowledged none of the batches sent")
        return n

    # -- HTTP -------------------------------------------------------------------------
    def _post(self, body: bytes, encoding: str) -> dict[str, Any]:
        import json

        path = self._prefix + PATH
        headers = signed_headers(
            self._secret, self.device_id, path, body, timestamp=int(time.time()), link=self.link
        )
        headers["Content-Type"] = CONTENT_TYPE
        headers["Content-Encoding"] = encoding
        headers["Content-Length"] = str(len(body))
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                self._close_conn()
                if attempt == 0 and isinstance(
                    e, http.client.RemoteDisconnected | BrokenPipeError | ConnectionResetError
                ):
                    continue  # a kept-alive connection the server had closed: retry once
                _sync_errors.inc(1, "network")
                raise SyncError(f"cannot reach {self._host}:{self._port}: {e}") from None
            break
        if resp.status == 200:
            try:
                return json.loads(data)
            except ValueError:
                raise SyncError("receiver sent an unreadable response", status=200) from None
        retry_after = _retry_after(resp.getheader("Retry-After"))
        try:
            detail = json.loads(data).get("detail") or json.loads(data).get("error")
        except Exception:
            detail = data[:200].decode(errors="replace")
        _sync_errors.inc(1, str(resp.status))
        if resp.status >= 500 or resp.status == 429:
            self._close_conn()
        raise SyncError(
            f"receiver answered {resp.status}: {detail}",
            status=resp.status,
            retry_after=retry_after,
        )

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self.cfg.timeout_s, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self.cfg.timeout_s
                )
        return self._conn

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._close_conn()

    def _record_error(self, e: SyncError) -> None:
        self.status.last_error = str(e)
        self.status.last_error_ms = int(time.time() * 1000)
        self.status.online = e.status is not None

    def _count_bytes(self, n: int) -> None:
        day = time.strftime("%Y-%m-%d")
        if day != self.status.day:
            self.status.day, self.status.bytes_today = day, {}
        self.status.bytes_today[self.link] = self.status.bytes_today.get(self.link, 0) + n
        _bytes_sent.inc(n, self.link)


def _secret_bytes(secret: str | None) -> bytes:
    """The device secret as printed by ``edgepipe-cloud devices add`` (hex) -> key bytes."""
    if not secret:
        raise SyncError("sync.device_secret is not set (edgepipe-cloud devices add NAME prints it)")
    try:
        key = bytes.fromhex(secret.strip())
    except ValueError:
        raise SyncError("sync.device_secret is not the hex string the receiver issued") from None
    if len(key) < 16:
        raise SyncError("sync.device_secret is too short")
    return key


def _retry_after(v: str | None) -> float | None:
    if not v:
        return None
    try:
        return max(0.0, min(float(v), 3600.0))
    except ValueError:
        return None


async def _wait(stop: asyncio.Event, timeout: float, also: asyncio.Event | None = None) -> None:
    waits = [asyncio.ensure_future(stop.wait())]
    if also is not None:
        waits.append(asyncio.ensure_future(also.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
