"""A hostile alert webhook (a real TCP server on loopback) against the receiver's
:class:`WebhookSender`: an answer dribbled a byte at a time (each byte within the socket
timeout), a ``Retry-After`` that is not an ASCII number, a huge answer."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from cloud._alert_rules import Webhook
from cloud._alert_store import AlertRow
from cloud._webhook import WebhookSender
from tests.helpers.edge import wait_for

ALERT = AlertRow("k1", "breaker", "breaker_open", "gw", "critical", "firing", "gw: open")


@contextmanager
def raw_webhook(answer: bytes, *, byte_every_s: float | None = None) -> Iterator[str]:
    """A loopback HTTP server that reads each request's head and answers ``answer``: at
    once, or one byte every ``byte_every_s`` (a slow-loris answer, for as long as the
    test lasts)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536) or b"\r\n\r\n"
                if byte_every_s is None:
                    conn.sendall(answer)
                    return
                for i in range(len(answer)):
                    if stop.wait(byte_every_s):
                        return
                    conn.sendall(answer[i : i + 1])
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}/hook"
    finally:
        stop.set()
        srv.close()


def failing_twice(
    answer: bytes,
    *,
    timeout_s: float = 5,
    byte_every_s: float | None = None,
    until: str = "failures",
):
    """A sender to a webhook answering ``answer`` (see :func:`raw_webhook`), after it has
    offered one alert and failed two attempts at it (``until="refused"``: after it refused
    it for good), then stopped."""
    with raw_webhook(answer, byte_every_s=byte_every_s) as url:
        cfg = Webhook(url=url, timeout_s=timeout_s, retry_min_s=0.05, retry_max_s=0.1)
        sender = WebhookSender(cfg, uniform=lambda a, b: a)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(sender.run(), loop)
        try:
            sender.offer(ALERT)
            if until == "refused":
                wait_for(lambda: sender.refused >= 1, 30, "the notification refused")
            else:
                wait_for(lambda: sender.failures >= 2, 30, "two failed attempts")
        finally:

            async def stop() -> None:
                run = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in run:
                    t.cancel()
                await asyncio.gather(*run, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            sender.close()
    return sender


def test_an_answer_dribbled_byte_by_byte_ends_at_the_timeout() -> None:
    # every byte comes well within the socket timeout, so only a deadline on the whole
    # attempt ends it; before, the sender's one thread waited on it for hours (the status
    # line alone may be 64 KiB) and no later alert was delivered
    head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 60_000 + b"\r\nContent-Length: 0\r\n\r\n"
    sender = failing_twice(head, timeout_s=1, byte_every_s=0.05)
    assert sender.sent == 0 and sender.refused == 0
    assert "timed out" in (sender.last_error or ""), sender.last_error


def test_a_retry_after_that_is_not_an_ascii_number_is_a_retry() -> None:
    # "²".isdigit() is true but float("²") fails: the notification was refused for good
    sender = failing_twice(b"HTTP/1.1 503 Busy\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n")
    assert sender.refused == 0 and "503" in (sender.last_error or "")


def test_a_huge_answer_is_read_no_further_than_its_first_bytes() -> None:
    body = b"E" * (1 << 20)
    sender = failing_twice(b"HTTP/1.1 500 Oops\r\nContent-Length: 100000000\r\n\r\n" + body)
    assert len(sender.last_error or "") < 300 and "500" in (sender.last_error or "")


def test_a_redirect_is_refused_for_good_not_retried_for_ever() -> None:
    # redirects are not followed: a 3xx says the webhook URL is wrong, and retrying it held
    # that webhook's queue behind one notification for ever
    sender = failing_twice(
        b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n",
        until="refused",
    )
    assert sender.refused == 1 and sender.sent == 0 and sender.failures == 0
    assert "302" in (sender.last_error or "")
