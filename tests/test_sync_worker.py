"""Worker details against real HTTP servers: Retry-After, backoff bounds, batch classes."""

from __future__ import annotations

import http.server
import logging
import threading
import time
from pathlib import Path

import pytest

from core._backoff import Backoff
from core._clock import ManualClock
from core._errors import SyncError
from core._model import Batch
from sync._request import classify
from sync._transport import Transport
from tests.helpers.sync_env import (
    WorkerThread,
    fill_sync,
    sync_cfg,
    sync_count,
    unsynced,
    wait_until,
)


class _Busy(http.server.BaseHTTPRequestHandler):
    """A receiver that is overloaded: 503 with Retry-After on every upload."""

    hits = 0

    def do_POST(self) -> None:  # noqa: N802
        type(self).hits += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"error":"overloaded","detail":"too many uploads in progress"}'
        self.send_response(503)
        self.send_header("Retry-After", "7")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def busy_server():
    _Busy.hits = 0
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_retry_after_is_honoured(tmp_path: Path, busy_server, caplog) -> None:
    caplog.set_level(logging.WARNING, "edgepipe.sync")
    fill_sync(tmp_path, 2, 10)
    url = f"http://127.0.0.1:{busy_server.server_address[1]}"
    t = Transport(url, device_id="edge-1", secret=b"k" * 32, timeout_s=5)
    with pytest.raises(SyncError) as e:
        t.post_batches(b"x", "identity", "wifi")
    assert e.value.status == 503 and e.value.retry_after == 7.0
    assert "503 overloaded: too many uploads in progress" in str(e.value)
    t.close()

    def waits() -> float:
        return sync_count("edgepipe_sync_waits_total", reason="retry_after")

    def polls() -> float:
        return sync_count("edgepipe_sync_link_polls_total")

    waited = waits()
    # the worker's clock only moves when the test moves it: the 7 s cannot pass unnoticed
    clock = ManualClock(time.time())
    cfg = sync_cfg(url, "ab" * 32, backoff_min_s=0.05, links={"poll_s": 0.1})
    with WorkerThread(tmp_path, cfg, clock=clock):
        wait_until(lambda: _Busy.hits >= 2, 10, "the first attempt")
        wait_until(lambda: waits() > waited, 10, "the worker to take the Retry-After")
        # ten looks at the links into the wait: its own backoff would have retried after
        # 0.05 s, and it does not retry before the clock has moved the 7 s asked for
        looked = polls()
        wait_until(lambda: polls() >= looked + 10, 20, "the worker to wait a while")
        clock.advance(6.9)
        looked = polls()
        wait_until(lambda: polls() >= looked + 3, 20, "the worker to look at the clock again")
        assert _Busy.hits == 2  # one upload by hand + the worker's first
        clock.advance(0.2)  # 7.1 s after the refusal: the next try
        wait_until(lambda: _Busy.hits >= 3, 20, "the retry once the 7 s have passed")
        wait_until(lambda: waits() >= waited + 2, 10, "the second Retry-After taken")
    # the warning is what the operator reads in the journal: it must say when the next try is
    assert "next try in 7.0s" in caplog.text
    assert unsynced(tmp_path) == (2, 20)


def test_backoff_is_exponential_with_full_jitter() -> None:
    b = Backoff(1.0, 30.0)
    caps = [1, 2, 4, 8, 16, 30, 30, 30]
    for cap in caps:
        samples = []
        for _ in range(200):
            n = b.n
            samples.append(b.next())
            b.n = n
        assert all(0 <= s <= cap for s in samples)
        assert max(samples) > cap * 0.5  # jitter spans the range, not a fixed delay
        b.next()
    b.reset()
    assert b.next() <= 1.0


def test_classes() -> None:
    now = int(time.time() * 1000)
    old = now - 48 * 3600_000
    assert classify(Batch([old], [1.0], [0], [0]), now - 3600_000) == "bulk"
    assert classify(Batch([old, now], [1.0, 2.0], [0, 0], [0, 0]), now - 3600_000) == "recent"
    assert classify(Batch([old], [1.0], [0], [4]), now - 3600_000) == "alerts"
