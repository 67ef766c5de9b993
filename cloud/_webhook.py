"""Alert notifications to a webhook: the documented bodies (docs/alerts.md), an optional
HMAC signature, retries with backoff and a bounded queue.

Each :class:`WebhookSender` has its own queue and its own thread for the HTTP request, so
a webhook that hangs or refuses holds neither the event loop nor the threads that store
uploads.  While it is down, notifications wait in the queue (at most ``queue`` of them;
beyond, the oldest waiting one is dropped and counted) and the one in flight is retried
after an exponential backoff with jitter (``retry_min_s`` .. ``retry_max_s``, or the
webhook's ``Retry-After`` when longer).  An attempt ends after ``timeout_s`` in all (connect,
send, answer), however slowly the webhook trickles its answer.  A 2xx answer delivers it; a 4xx other than 408
and 429 refuses it for good (counted, logged: the webhook will not take that body), and so
does a 3xx (redirects are not followed: the URL is wrong, and retrying would hold the
webhook's queue behind that notification for ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from core._backoff import Backoff

from ._alert_rules import Webhook
from ._alert_store import AlertRow

__all__ = ["SIGNATURE_HEADER", "WebhookSender", "render", "sign"]

log = logging.getLogger("edgepipe.cloud.alerts")

SIGNATURE_HEADER = "X-Edgepipe-Alert-Signature"
#: Most bytes of an answer read (the body is only kept for the error message).
_ANSWER_MAX = 4096
_ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "not ended"


def _rfc3339(ms: int | None) -> str:
    if ms is None:
        return _ZERO_TIME
    t = time.gmtime(ms // 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ms % 1000:03d}Z"


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _links(alert: AlertRow, dashboard_url: str | None) -> str:
    if not dashboard_url:
        return ""
    from urllib.parse import quote

    return f"{dashboard_url.rstrip('/')}/devices/{quote(alert.device, safe='')}"


def _annotations(alert: AlertRow) -> dict[str, str]:
    out = {"summary": alert.summary}
    if alert.value is not None:
        out["value"] = f"{alert.value:g}"
    return out


def render(
    fmt: str, alert: AlertRow, *, dashboard_url: str | None = None, routing_key: str | None = None
) -> dict[str, Any]:
    """The JSON body of one notification in ``fmt`` (docs/alerts.md)."""
    link = _links(alert, dashboard_url)
    if fmt == "slack":
        mark = ":red_circle: FIRING" if alert.state == "firing" else ":white_check_mark: RESOLVED"
        text = f"{mark} [{alert.severity}] {alert.rule}: {alert.summary}"
        # Slack's mrkdwn takes &, < and > as markup: escaped, so a device name is only text.
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        if link:
            text += f" <{link}|dashboard>"
        return {"text": text}
    if fmt == "pagerduty":
        body: dict[str, Any] = {
            "routing_key": routing_key,
            "event_action": "trigger" if alert.state == "firing" else "resolve",
            "dedup_key": alert.key,
        }
        if alert.state == "firing":
            body["payload"] = {
                "summary": alert.summary[:1024],
                "source": alert.device,
                "severity": alert.severity,
                "timestamp": _rfc3339(alert.started_ms),
                "class": alert.kind,
                "group": alert.rule,
                "custom_details": {**alert.labels, **_annotations(alert)},
            }
            if link:
                body["links"] = [{"href": link, "text": "edgepipe dashboard"}]
        return body
    # Alertmanager's webhook payload (version 4), one alert per notification.
    one = {
        "status": alert.state,
        "labels": alert.labels,
        "annotations": _annotations(alert),
        "startsAt": _rfc3339(alert.started_ms),
        "endsAt": _rfc3339(alert.resolved_ms if alert.state == "resolved" else None),
        "generatorURL": link,
        "fingerprint": fingerprint(alert.key),
    }
    return {
        "version": "4",
        "groupKey": alert.key,
        "truncatedAlerts": 0,
        "status": alert.state,
        "receiver": "edgepipe",
        "groupLabels": {"alertname": alert.rule, "device": alert.device},
        "commonLabels": alert.labels,
        "commonAnnotations": one["annotations"],
        "externalURL": dashboard_url or "",
        "alerts": [one],
    }


def sign(key: bytes, body: bytes, timestamp: int) -> str:
    """``t=<unix s>,v1=<hex HMAC-SHA256(key, "<t>." + body)>``."""
    mac = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def redacted(url: str) -> str:
    """The webhook's scheme and host only: its path often is its credential (Slack)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname or ''}{f':{p.port}' if p.port else ''}/…"


def _header_text(text: str) -> str:
    """``text`` as a header value: ASCII, no control characters, at most 300 characters."""
    ascii_ = text.encode("ascii", "backslashreplace").decode()
    return "".join(c if " " <= c < "\x7f" else "?" for c in ascii_)[:300]


class _Answer(Exception):
    def __init__(self, status: int, text: str, retry_after: float | None) -> None:
        self.status, self.text, self.retry_after = status, text, retry_after
        super().__init__(f"HTTP {status}: {text[:200]}")


class WebhookSender:
    """One webhook's queue and delivery loop (``run()`` on the receiver's event loop)."""

    def __init__(
        self,
        cfg: Webhook,
        *,
        key: bytes | None = None,
        routing_key: str | None = None,
        dashboard_url: str | None = None,
        on_done: Callable[[WebhookSender, AlertRow], None] = lambda s, a: None,
        on_dropped: Callable[[WebhookSender, AlertRow], None] = lambda s, a: None,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.cfg, self.key, self.routing_key = cfg, key, routing_key
        self.dashboard_url = dashboard_url
        self.on_done = on_done  # delivered or refused: called in the sender's thread
        self.on_dropped = on_dropped  # dropped from the full queue: called where offered
        self.rules = frozenset(cfg.rules) if cfg.rules is not None else None
        self._queue: deque[AlertRow] = deque()
        self._lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff = Backoff(cfg.retry_min_s, cfg.retry_max_s, uniform=uniform)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="webhook")
        self.sent = self.failures = self.dropped = self.refused = 0
        self.last_error: str | None = None
        self.last_ok_ms: int | None = None
        self.inflight: AlertRow | None = None

    def takes(self, alert: AlertRow) -> bool:
        return self.rules is None or alert.rule in self.rules

    # -- the queue ----------------------------------------------------------------------
    def offer(self, alert: AlertRow) -> bool:
        """Queue a notification (never blocks; any thread).  When the queue is full the
        oldest waiting notification is dropped (counted) to make room."""
        if not self.takes(alert):
            return False
        lost: AlertRow | None = None
        with self._lock:
            if len(self._queue) >= self.cfg.queue:
                lost = self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning(
                        "alert webhook %s: queue full (%d), dropped %s %s (%d dropped so far)",
                        redacted(self.cfg.url),
                        self.cfg.queue,
                        lost.state,
                        lost.key,
                        self.dropped,
                    )
            self._queue.append(alert)
        if lost is not None:
            self.on_dropped(self, lost)
        if self._loop is not None and self._wake is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the receiver is stopping: it stays undelivered, in the db
                pass
        return True

    def queued(self) -> int:
        with self._lock:
            return len(self._queue) + (self.inflight is not None)

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": redacted(self.cfg.url),
            "format": self.cfg.format,
            "queued": self.queued(),
            "queue_max": self.cfg.queue,
            "sent": self.sent,
            "failures": self.failures,
            "dropped": self.dropped,
            "refused": self.refused,
            "last_error": self.last_error,
            "last_ok_ms": self.last_ok_ms,
        }

    # -- delivery -----------------------------------------------------------------------
    async def run(self) -> None:
        """Deliver until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            with self._lock:
                alert = self._queue.popleft() if self._queue else None
                self.inflight = alert
            if alert is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            await self._deliver(alert)
            with self._lock:
                self.inflight = None

    async def _deliver(self, alert: AlertRow) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self._pool, self._post, alert)
            except _Answer as a:
                if 300 <= a.status < 500 and a.status not in (408, 429):
                    self.refused += 1
                    self.last_error = str(a)
                    log.error(
                        "alert webhook %s refused %s %s: %s",
                        redacted(self.cfg.url),
                        alert.state,
                        alert.key,
                        a,
                    )
                    await loop.run_in_executor(self._pool, self.on_done, self, alert)
                    return
                delay = self._retry(str(a), a.retry_after)
            except OSError as e:  # refused, unreachable, timed out, TLS
                delay = self._retry(f"{type(e).__name__}: {e}", None)
            except Exception as e:  # a body or URL this sender cannot send at all
                self.refused += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("alert webhook %s cannot send %s", redacted(self.cfg.url), alert.key)
                await loop.run_in_executor(self._pool, self.on_done, self, alert)
                return
            else:
                self.sent += 1
                self.last_ok_ms = int(time.time() * 1000)
                self._backoff.reset()
                await loop.run_in_executor(self._pool, self.on_done, self, alert)
                return
            await asyncio.sleep(delay)

    def _retry(self, why: str, retry_after: float | None) -> float:
        self.failures += 1
        if self.last_error is None or self.failures % 100 == 1:
            log.warning("alert webhook %s failed (%s); retrying", redacted(self.cfg.url), why)
        self.last_error = why
        delay = self._backoff.next()
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cfg.retry_max_s))
        return delay

    def body(self, alert: AlertRow) -> bytes:
        doc = render(
            self.cfg.format,
            alert,
            dashboard_url=self.dashboard_url,
            routing_key=self.routing_key,
        )
        return json.dumps(doc, separators=(",", ":")).encode()

    def _post(self, alert: AlertRow) -> None:
        """One attempt, in the sender's own thread.  Raises :class:`_Answer` for a non-2xx
        answer, ``OSError`` when no answer came."""
        body = self.body(alert)
        u = urlsplit(self.cfg.url)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "edgepipe-cloud",
            "X-Edgepipe-Alert-Key": _header_text(alert.key),
        }
        if self.key is not None:
            headers[SIGNATURE_HEADER] = sign(self.key, body, int(time.time()))
        conn: http.client.HTTPConnection
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(
                u.hostname or "", u.port, timeout=self.cfg.timeout_s,
                context=ssl.create_default_context(),
            )  # fmt: skip
        else:
            conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=self.cfg.timeout_s)
        # ``timeout`` bounds each socket operation; the attempt as a whole ends at the same
        # deadline (an answer dribbled a byte at a time would hold the thread for hours).
        expired = threading.Event()

        def cut() -> None:
            expired.set()
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        deadline = threading.Timer(self.cfg.timeout_s, cut)
        deadline.daemon = True
        deadline.start()
        try:
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            conn.request("POST", path, body=body, headers=headers)
            r = conn.getresponse()
            text = r.read(_ANSWER_MAX).decode("utf-8", "replace")
            if expired.is_set():  # what was read ends where the deadline cut it
                raise OSError("cut at the deadline")
            if not 200 <= r.status < 300:
                ra = r.getheader("Retry-After")
                ra = (ra or "").strip()
                retry_after = float(ra) if ra.isascii() and ra.isdigit() else None
                raise _Answer(r.status, text, retry_after)
        except (http.client.HTTPException, OSError) as e:
            if expired.is_set():
                raise TimeoutError(
                    f"timed out: no complete answer within {self.cfg.timeout_s:g} s"
                ) from None
            if isinstance(e, OSError):
                raise
            raise OSError(f"bad answer: {e}") from None  # a malformed answer: no answer
        finally:
            deadline.cancel()
            conn.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
