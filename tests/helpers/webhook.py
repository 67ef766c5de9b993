"""A real HTTP webhook receiver on loopback (``http.server`` in a thread) that records
every POST and answers with the statuses it is told to, for the alert tests."""

from __future__ import annotations

import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.helpers.edge import wait_for

__all__ = ["WebhookRecorder"]


class WebhookRecorder:
    """``with WebhookRecorder() as hook: ... hook.wait(2)``; ``hook.answer(500, 500)``
    makes the next two POSTs fail with 500 (then 200 again)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.answers: deque[int] = deque()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                with outer._lock:
                    status = outer.answers.popleft() if outer.answers else 200
                    outer.posts.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "raw": raw,
                            "body": json.loads(raw),
                            "status": status,
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookRecorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, *statuses: int) -> None:
        with self._lock:
            self.answers.extend(statuses)

    def delivered(self) -> list[dict[str, Any]]:
        """The bodies of the POSTs answered 2xx, in arrival order."""
        with self._lock:
            return [p["body"] for p in self.posts if 200 <= p["status"] < 300]

    def wait(self, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        """Until ``n`` POSTs were answered 2xx; returns their bodies."""
        wait_for(lambda: len(self.delivered()) >= n, timeout, f"{n} webhook deliveries")
        return self.delivered()
