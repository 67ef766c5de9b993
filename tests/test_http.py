"""The health and metrics listener, over real TCP connections on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import httpx
import pytest

from core._metrics import Metrics
from pipeline._http import MAX_CONNECTIONS, MAX_HEAD_BYTES, HealthServer, parse_listen


class Readiness:
    def __init__(self) -> None:
        self.state: tuple[bool, str] = (True, "")
        self.raises = False

    def __call__(self) -> tuple[bool, str]:
        if self.raises:
            raise OSError("store directory vanished")
        return self.state


class Running:
    """A HealthServer on its own event loop thread, as in the edge process."""

    def __init__(self, metrics: Metrics, ready: Readiness) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = HealthServer("127.0.0.1:0", ready, metrics)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())
        self.base = f"http://127.0.0.1:{self.server.port}"

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def ready() -> Readiness:
    return Readiness()


@pytest.fixture
def srv(metrics: Metrics, ready: Readiness) -> Iterator[Running]:
    running = Running(metrics, ready)
    yield running
    running.stop()


def raw(srv: Running, data: bytes, shut: bool = True) -> bytes:
    """Send raw bytes, return everything the server answers before closing."""
    with socket.create_connection(("127.0.0.1", srv.server.port), timeout=10) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_healthz_with_urllib(srv: Running) -> None:
    with urllib.request.urlopen(srv.base + "/healthz", timeout=10) as r:
        assert r.status == 200
        assert r.read() == b"ok\n"
        assert r.headers["Connection"] == "close"
        assert r.headers["Content-Type"].startswith("text/plain")


def test_readyz_follows_the_callable(srv: Running, ready: Readiness) -> None:
    with httpx.Client(base_url=srv.base, timeout=10) as c:
        r = c.get("/readyz")
        assert (r.status_code, r.text) == (200, "ready\n")
        ready.state = (False, "broker disconnected")
        r = c.get("/readyz")
        assert r.status_code == 503
        assert "broker disconnected" in r.text
        ready.state = (True, "")
        assert c.get("/readyz").status_code == 200


def test_readyz_when_the_check_raises(srv: Running, ready: Readiness) -> None:
    ready.raises = True
    r = httpx.get(srv.base + "/readyz", timeout=10)
    assert r.status_code == 503
    assert "OSError" in r.text
    # the listener survives and keeps answering
    assert httpx.get(srv.base + "/healthz", timeout=10).status_code == 200


def test_metrics_renders_registry_and_process_gauges(srv: Running, metrics: Metrics) -> None:
    dropped = metrics.counter(
        "edgepipe_readings_dropped_total", "Readings dropped.", ["stage", "reason"]
    )
    dropped.inc(3, "validity", "filtered")
    r = httpx.get(srv.base + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'edgepipe_readings_dropped_total{stage="validity",reason="filtered"} 3' in text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    # a Python process with this test suite loaded is well above 10 MB and below 4 GB
    assert 10e6 < samples["process_resident_memory_bytes"] < 4e9
    assert samples["process_cpu_seconds_total"] > 0
    assert samples["process_open_fds"] >= 3
    assert samples["process_open_fds"] <= samples["process_max_fds"]
    assert samples["process_start_time_seconds"] > 1.5e9


def test_process_gauges_are_current_at_scrape_time(srv: Running) -> None:
    def open_fds() -> float:
        text = httpx.get(srv.base + "/metrics", timeout=10).text
        line = next(ln for ln in text.splitlines() if ln.startswith("process_open_fds "))
        return float(line.split()[1])

    before = open_fds()
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(20)]
    try:
        assert open_fds() >= before + 20
    finally:
        for fd in held:
            os.close(fd)


def test_process_gauges_registered_once(metrics: Metrics, ready: Readiness) -> None:
    a, b = Running(metrics, ready), Running(metrics, ready)
    try:
        text = httpx.get(b.base + "/metrics", timeout=10).text
        assert text.count("# TYPE process_resident_memory_bytes gauge") == 1
    finally:
        a.stop()
        b.stop()


def test_unknown_path_is_404(srv: Running) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(srv.base + "/admin", timeout=10)
    assert e.value.code == 404


def test_query_string_is_ignored(srv: Running) -> None:
    assert httpx.get(srv.base + "/healthz?verbose=1", timeout=10).status_code == 200


def test_head_has_no_body(srv: Running) -> None:
    response = raw(srv, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(response) == 200
    assert response.endswith(b"\r\n\r\n")
    assert b"Content-Length: 3" in response


def test_other_methods_are_405(srv: Running) -> None:
    r = httpx.post(srv.base + "/healthz", content=b"x", timeout=10)
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz\r\n\r\n", 400),
        (b"GET  /healthz HTTP/1.1\r\n\r\n", 400),
        (b"get /healthz HTTP/1.1\r\n\r\n", 400),
        (b"GET healthz HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTX/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
        (b"GET /h\xc3\xa9 HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", 400),  # EOF before the blank line
    ],
)
def test_malformed_requests_are_400(srv: Running, request_bytes: bytes, status: int) -> None:
    assert status_of(raw(srv, request_bytes)) == status
    assert httpx.get(srv.base + "/healthz", timeout=10).status_code == 200


def test_bare_lf_line_endings_are_accepted(srv: Running) -> None:
    assert status_of(raw(srv, b"GET /healthz HTTP/1.0\n\n")) == 200


def test_request_size_is_bounded(srv: Running) -> None:
    long_line = b"GET /" + b"a" * (2 * MAX_HEAD_BYTES) + b" HTTP/1.1\r\n\r\n"
    assert status_of(raw(srv, long_line)) == 414
    many_headers = b"GET /healthz HTTP/1.1\r\n" + (b"X-Pad: " + b"b" * 100 + b"\r\n") * 200
    assert status_of(raw(srv, many_headers + b"\r\n")) == 431
    assert httpx.get(srv.base + "/healthz", timeout=10).status_code == 200


def test_connection_closed_after_response(srv: Running) -> None:
    # two pipelined requests on one connection: only the first is answered
    response = raw(srv, b"GET /healthz HTTP/1.1\r\n\r\nGET /readyz HTTP/1.1\r\n\r\n", shut=False)
    assert response.count(b"HTTP/1.1 ") == 1
    assert response.endswith(b"ok\n")


def test_silent_client_does_not_block_others(srv: Running) -> None:
    with socket.create_connection(("127.0.0.1", srv.server.port), timeout=10):
        # an open connection that never sends anything
        assert httpx.get(srv.base + "/healthz", timeout=10).status_code == 200


def test_connection_count_is_bounded(srv: Running) -> None:
    idle = [
        socket.create_connection(("127.0.0.1", srv.server.port), timeout=10)
        for _ in range(MAX_CONNECTIONS)
    ]
    try:
        # wait until the server has accepted all of them
        deadline = 0
        while len(srv.server._tasks) < MAX_CONNECTIONS and deadline < 1000:
            threading.Event().wait(0.01)
            deadline += 1
        assert httpx.get(srv.base + "/healthz", timeout=10).status_code == 503
    finally:
        for s in idle:
            s.close()


def test_abrupt_disconnects_do_not_hurt(srv: Running) -> None:
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", srv.server.port), timeout=10)
        s.sendall(b"GET /metr")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST
    assert httpx.get(srv.base + "/metrics", timeout=10).status_code == 200


def test_close_is_idempotent_and_context_manager(metrics: Metrics, ready: Readiness) -> None:
    async def main() -> int:
        async with HealthServer("127.0.0.1:0", ready, metrics) as server:
            port = server.port
            assert port != 0
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert (await reader.read()).endswith(b"ok\n")
            writer.close()
            # a connection still open at close time is dropped, not waited for
            await asyncio.open_connection("127.0.0.1", port)
        await server.close()
        await server.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(RuntimeError):
            await server.start()
        return port

    asyncio.run(asyncio.wait_for(main(), 20))


@pytest.mark.parametrize(
    "listen, expected",
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        (":9108", (None, 9108)),
        ("[::1]:9108", ("::1", 9108)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str | None, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9108", "host:", "host:http", "host:70000", "::1:9108"])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ValueError, match="listen address"):
        parse_listen(listen)
