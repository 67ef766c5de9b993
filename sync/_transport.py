"""HTTP(S) to the receiver with the standard library's ``http.client`` (called on a worker
thread): no extra import weight on the edge process.  One kept-alive connection; every
attempt is signed afresh (new timestamp and nonce), so a retry is never refused as a replay.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core._errors import SyncError
from protocol._signing import signed_headers_v2

__all__ = ["PATH_BATCHES", "PATH_PING", "Transport", "secret_bytes"]

PATH_BATCHES = "/v1/batches"
PATH_PING = "/v1/ping"


class Transport:
    def __init__(
        self,
        url: str,
        *,
        device_id: str,
        secret: bytes,
        timeout_s: float,
        ca_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SyncError(f"sync.url must be http(s)://host[:port][/prefix], not {url!r}")
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/")
        self.device_id = device_id
        self._secret = secret
        self.timeout_s = timeout_s
        self.ca_file = ca_file
        self._clock = clock
        self._ssl: ssl.SSLContext | None = None
        if self.https:
            try:
                self._ssl = ssl.create_default_context(
                    cafile=str(ca_file) if ca_file is not None else None
                )
            except (OSError, ssl.SSLError) as e:
                raise SyncError(f"cannot load sync.ca_file {ca_file}: {e}") from None
        self._conn: http.client.HTTPConnection | None = None

    @property
    def where(self) -> str:
        return f"{'https' if self.https else 'http'}://{self.host}:{self.port}"

    # -- requests ---------------------------------------------------------------------------
    def ping(self) -> None:
        """GET /v1/ping; raises SyncError when the receiver is not reachable."""
        status, _, data = self._request("GET", self.prefix + PATH_PING, None, {})
        if status != 200:
            raise SyncError(f"{self.where} answered the probe with {status}", status=status)

    def post_batches(self, body: bytes, encoding: str, link: str) -> dict[str, Any]:
        path = self.prefix + PATH_BATCHES
        headers = self._signer("POST", path, body, link, encoding=encoding)
        status, resp, data = self._request("POST", path, body, headers)
        if status == 200:
            try:
                out = json.loads(data)
                if not isinstance(out, dict):
                    raise ValueError
                theirs = resp.getheader("X-Edgepipe-Time") or ""
                if theirs.isdigit() and len(theirs) <= 16:  # the receiver's clock (ms)
                    out["time_ms"] = int(theirs)
                return out
            except ValueError:
                raise SyncError("the receiver sent an unreadable response", status=200) from None
        retry_after = _retry_after(resp.getheader("Retry-After"))
        code, detail = _error_fields(data)
        if status >= 500 or status == 429:
            self.close()
        raise SyncError(
            f"{self.where} refused the upload: {status} {code}: {detail}",
            status=status,
            retry_after=retry_after,
        )

    def signed(
        self,
        method: str,
        path: str,
        body: bytes,
        link: str,
        *,
        limit: int,
        content_type: str = "application/json",
    ) -> tuple[int, bytes, dict[str, str]]:
        """A v2-signed request to ``prefix + path`` (the bundle check-in and module
        downloads); -> (status, body, headers).  At most ``limit + 1`` bytes of the body are
        read (the caller refuses a longer one; the connection is then dropped)."""
        full = self.prefix + path
        headers = self._signer(method, full, body, link, content_type=content_type)
        status, resp, data = self._request(method, full, body, headers, limit=limit)
        if len(data) > limit or status >= 500 or status == 429:
            self.close()
        return status, data, {k.lower(): v for k, v in resp.getheaders()}

    def _signer(
        self, method: str, path: str, body: bytes, link: str, **kw: str
    ) -> Callable[[], dict[str, str]]:
        """The headers of one signed attempt, made afresh per attempt (new timestamp and
        nonce); ``kw``: ``encoding``, ``content_type``."""

        def headers() -> dict[str, str]:
            h = signed_headers_v2(
                self._secret,
                self.device_id,
                path,
                body,
                timestamp=int(self._clock()),
                link=link,
                method=method,
                **kw,  # type: ignore[arg-type]
            )
            h["Content-Length"] = str(len(body))
            return h

        return headers

    def _request(
        self, method: str, path: str, body: bytes | None, headers: Any, *, limit: int | None = None
    ) -> tuple[int, http.client.HTTPResponse, bytes]:
        for attempt in (0, 1):
            conn = self._connection()
            try:
                h = headers() if callable(headers) else headers
                conn.request(method, path, body=body, headers=h)
                resp = conn.getresponse()
                data = resp.read() if limit is None else resp.read(limit + 1)
            except ssl.SSLCertVerificationError as e:
                self.close()
                ca = self.ca_file or "the system CA store"
                raise SyncError(
                    f"TLS certificate of {self.host}:{self.port} could not be verified "
                    f"against {ca}: {e.verify_message or e.reason}"
                ) from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                stale_keepalive = isinstance(
                    e, http.client.RemoteDisconnected | BrokenPipeError | ConnectionResetError
                )
                if attempt == 0 and stale_keepalive and self._reused:
                    continue  # a kept-alive connection the server had closed: retry once
                raise SyncError(f"cannot reach {self.where}: {_describe(e)}") from None
            self._reused = True
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
            return resp.status, resp, data
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._reused = False
            if self.https:
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout_s, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout_s
                )
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    text = str(e) or type(e).__name__
    return text


def _error_fields(data: bytes) -> tuple[str, str]:
    try:
        obj = json.loads(data)
        return str(obj.get("error", "error")), str(obj.get("detail", ""))[:300]
    except Exception:
        return "error", data[:200].decode(errors="replace")


def _retry_after(v: str | None) -> float | None:
    if not v:
        return None
    try:
        return max(0.0, min(float(v), 3600.0))
    except ValueError:
        return None


def secret_bytes(secret: str | None) -> bytes:
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
