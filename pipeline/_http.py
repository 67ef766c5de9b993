"""The edge process's health and metrics listener: ``/healthz``, ``/readyz``, ``/metrics``.

A deliberately tiny HTTP/1.1 server on :func:`asyncio.start_server` with a hand-parsed
request line -- no ``http.server``, no third-party imports -- because the whole edge process
lives within 50 MB RSS.  One request per connection; the connection is closed after the
response.  Requests are bounded in size and time; nothing a client sends can take the
process down.

- ``GET /healthz``  200 ``ok`` while the event loop runs (Kubernetes liveness probe).
- ``GET /readyz``   200 ``ready``, or 503 with the reason from the ``ready`` callable
  (the store is unwritable, the chain failed to load, the broker is disconnected ...).
- ``GET /metrics``  the Prometheus text exposition of :data:`core._metrics.METRICS`,
  including ``process_*`` gauges read from ``/proc/self`` at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Callable
from types import TracebackType

from core._metrics import METRICS, Metrics

__all__ = ["HealthServer", "parse_listen", "register_process_metrics"]

log = logging.getLogger("edgepipe.http")

#: Largest request head (request line + headers) accepted, in bytes.
MAX_HEAD_BYTES = 8192
#: Most header lines accepted.
MAX_HEADER_LINES = 64
#: Seconds a client may take to send its request head.
READ_TIMEOUT_S = 5.0
#: Seconds allowed to write a response before the connection is dropped.
WRITE_TIMEOUT_S = 10.0
#: Connections served at once; more are answered 503 and closed.
MAX_CONNECTIONS = 32

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TEXT = "text/plain; charset=utf-8"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"

ReadyCheck = Callable[[], tuple[bool, str]]


def parse_listen(listen: str) -> tuple[str | None, int]:
    """``'host:port'``, ``'[v6]:port'`` or ``':port'`` (all interfaces) -> ``(host, port)``."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {listen!r} is not HOST:PORT (port 0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"listen address {listen!r}: write IPv6 hosts in brackets, [::1]:9108")
    return (host or None), int(port_text)


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class HealthServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics`` on ``listen`` until closed.

    ``ready`` is called for every ``/readyz`` request on the event loop and must be cheap;
    it returns ``(True, "")`` or ``(False, "why not")``.  If it raises, the answer is 503.
    ``port`` is the bound port once :meth:`start` returned (so ``127.0.0.1:0`` works).
    """

    def __init__(self, listen: str, ready: ReadyCheck, metrics: Metrics = METRICS) -> None:
        self.host, self.port = parse_listen(listen)
        self._ready = ready
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("HealthServer is closed")
        if self._server is not None:
            return
        register_process_metrics(self._metrics)
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self.port, limit=MAX_HEAD_BYTES, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health and metrics listener on %s:%d", self.host or "*", self.port)

    async def close(self) -> None:
        """Stop listening and drop open connections; safe to call more than once."""
        self._closed = True
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- one connection ----------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if len(self._tasks) > MAX_CONNECTIONS:
                await self._respond(writer, "GET", 503, "too many connections\n")
            else:
                await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:  # never let a client take the listener (or the process) down
            log.debug("health listener: connection failed", exc_info=True)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path = await asyncio.wait_for(_read_head(reader), READ_TIMEOUT_S)
        except _BadRequest as e:
            await self._respond(writer, "GET", e.status, e.reason + "\n")
            return
        except TimeoutError:
            await self._respond(writer, "GET", 408, "request not received in time\n")
            return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        status, ctype, body = self._route(method, path)
        headers = {"Allow": "GET, HEAD"} if status == 405 else {}
        await self._respond(writer, method, status, body, ctype, headers)

    def _route(self, method: str, path: str) -> tuple[int, str, str]:
        if path not in ("/healthz", "/readyz", "/metrics"):
            return 404, _TEXT, "not found\n"
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, "method not allowed\n"
        if path == "/healthz":
            return 200, _TEXT, "ok\n"
        if path == "/readyz":
            try:
                ok, reason = self._ready()
            except Exception as e:
                log.warning("readiness check raised %s", type(e).__name__, exc_info=True)
                return 503, _TEXT, f"readiness check failed: {type(e).__name__}\n"
            if ok:
                return 200, _TEXT, "ready\n"
            return 503, _TEXT, f"not ready: {reason or 'unknown reason'}\n"
        try:
            return 200, _PROMETHEUS, self._metrics.render()
        except Exception as e:
            log.warning("rendering metrics failed", exc_info=True)
            return 500, _TEXT, f"rendering metrics failed: {type(e).__name__}\n"

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        status: int,
        body: str,
        ctype: str = _TEXT,
        headers: dict[str, str] | None = None,
    ) -> None:
        payload = body.encode("utf-8")
        head = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(payload)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("ascii")
        writer.write(data if method == "HEAD" else data + payload)
        try:
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Read the request line and headers (bounded); return ``(method, path)``."""
    total = 0
    lines: list[bytes] = []
    while True:
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):  # one line longer than the limit
            raise _BadRequest(431 if lines else 414, "request head too large") from None
        if not line:  # EOF before the blank line
            if not lines:
                raise asyncio.IncompleteReadError(b"", None)
            raise _BadRequest(400, "incomplete request head")
        total += len(line)
        if total > MAX_HEAD_BYTES or len(lines) > MAX_HEADER_LINES:
            raise _BadRequest(431, "request head too large")
        if line in (b"\r\n", b"\n"):
            if not lines:  # tolerate stray blank lines before the request line
                continue
            break
        lines.append(line)
    return _parse_request_line(lines[0])


def _parse_request_line(raw: bytes) -> tuple[str, str]:
    try:
        text = raw.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise _BadRequest(400, "request line is not ASCII") from None
    parts = text.split(" ")
    if len(parts) != 3 or not all(parts):
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if not method.isalpha() or not method.isupper():
        raise _BadRequest(400, "malformed method")
    if not version.startswith("HTTP/") or version[5:] not in ("1.0", "1.1"):
        if version.startswith("HTTP/") and version[5:6].isdigit():
            raise _BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        raise _BadRequest(400, "malformed HTTP version")
    if not target.startswith("/") or any(c < "!" or c > "~" for c in target):
        raise _BadRequest(400, "malformed request target")
    return method, target.split("?", 1)[0]


# -- process gauges ------------------------------------------------------------------

_registered: weakref.WeakSet[Metrics] = weakref.WeakSet()


def register_process_metrics(metrics: Metrics = METRICS, proc: str = "/proc/self") -> None:
    """Add the ``process_*`` gauges (read from ``proc`` per scrape) to ``metrics``, once.

    Memory comes from ``statm`` and CPU time from :func:`os.times`, not from ``stat``:
    qemu-user (the arm64 CI, docs/arm64.md) fills the emulated ``/proc/self/stat`` with
    zeros, while ``statm`` and the ``times`` system call are right everywhere.  The start
    time is ``stat``'s when it has one, else the time these gauges were registered (at
    start-up)."""
    if metrics in _registered or not os.path.exists(f"{proc}/statm"):
        return
    _registered.add(metrics)
    rss = metrics.gauge("process_resident_memory_bytes", "Resident memory size in bytes.")
    vms = metrics.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.")
    cpu = metrics.gauge("process_cpu_seconds_total", "Total user and system CPU time in seconds.")
    fds = metrics.gauge("process_open_fds", "Number of open file descriptors.")
    max_fds = metrics.gauge("process_max_fds", "Maximum number of open file descriptors.")
    start = metrics.gauge(
        "process_start_time_seconds", "Start time of the process since the Unix epoch in seconds."
    )
    page = os.sysconf("SC_PAGE_SIZE")
    started = _start_time(proc)
    start.set(started if started is not None else time.time())
    # the soft limit, from limits ("Max open files  1024  1048576  files")
    try:
        with open(f"{proc}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    if soft.isdigit():
                        max_fds.set(int(soft))
    except OSError:
        pass

    def collect(m: Metrics) -> None:
        with open(f"{proc}/statm", "rb") as f:
            # proc(5): size resident shared text lib data dt, in pages
            size, resident = f.read().split()[:2]
        vms.set(int(size) * page)
        rss.set(int(resident) * page)
        t = os.times()
        cpu.set(t.user + t.system)
        fds.set(len(os.listdir(f"{proc}/fd")))

    metrics.add_collector(collect)


def _start_time(proc: str) -> float | None:
    """The process's start time from ``stat`` and the boot time, or ``None`` without one."""
    boot = _boot_time()
    try:
        with open(f"{proc}/stat", "rb") as f:
            stat = f.read()
        # fields after the parenthesised command name, which may itself contain spaces;
        # proc(5) numbers them from 1: starttime is field 22, in clock ticks since boot
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    if boot is None or ticks <= 0:  # qemu-user reports 0
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None
