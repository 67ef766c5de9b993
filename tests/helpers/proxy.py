"""A TCP proxy on 127.0.0.1 for network fault tests (threads, no dependencies).

    with Proxy(("127.0.0.1", receiver_port)) as p:
        p.cut()          # close every connection and refuse new ones
        p.restore()
        p.delay(200)     # 200 ms before each forwarded chunk
        p.flap(2, 3)     # up 2 s, down 3 s, repeatedly, until p.stop_flap()
        p.cut_responses(1)  # forward the next request, drop its response, close
        p.tamper(1)      # flip one byte near the end of the next request body
        p.captured()     # the raw bytes every client sent on each connection

Real sockets on loopback: the client sees a refused connection, a reset, a timeout or a
half-answered request exactly as it would across a broken network.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

__all__ = ["Proxy"]


class Proxy:
    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.host = "127.0.0.1"
        self.port = port
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._closed = False
        self._delay_s = 0.0
        self._drop_responses = 0
        self._tamper = 0
        self._flap_stop: threading.Event | None = None
        self._flap_thread: threading.Thread | None = None
        self._captured: list[bytearray] = []
        self.connections = 0
        self.responses_dropped = 0
        self.requests_tampered = 0

    # -- life -------------------------------------------------------------------------------
    def __enter__(self) -> Proxy:
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.stop_flap()
        self._closed = True
        self.cut()

    def restore(self) -> None:
        """Accept connections again (on the same port)."""
        with self._lock:
            if self._listener is not None:
                return
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.host, self.port))
            s.listen(64)
            s.settimeout(0.1)
            self.port = s.getsockname()[1]
            self._listener = s
            t = threading.Thread(target=self._accept, args=(s,), daemon=True)
            self._accept_thread = t
            t.start()

    def cut(self) -> None:
        """Close every open connection (RST) and refuse new ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = list(self._conns), set()
        if listener is not None:
            listener.close()
        for c in conns:
            _abort(c)
        t = self._accept_thread
        if t is not None and t is not threading.current_thread():
            t.join(2)

    # -- faults ------------------------------------------------------------------------------
    def delay(self, ms: float) -> None:
        self._delay_s = ms / 1000.0

    def cut_responses(self, n: int = 1) -> None:
        """For the next ``n`` requests: forward the request, drop the response, close."""
        with self._lock:
            self._drop_responses = n

    def tamper(self, n: int = 1) -> None:
        """Flip a byte in the body of the next ``n`` requests (a forged request)."""
        with self._lock:
            self._tamper = n

    def flap(self, up_s: float, down_s: float) -> None:
        self.stop_flap()
        stop = threading.Event()

        def run() -> None:
            while not stop.is_set():
                self.restore()
                if stop.wait(up_s):
                    break
                self.cut()
                if stop.wait(down_s):
                    break
            self.restore()

        self._flap_stop = stop
        self._flap_thread = threading.Thread(target=run, daemon=True)
        self._flap_thread.start()

    def stop_flap(self) -> None:
        if self._flap_stop is not None:
            self._flap_stop.set()
            assert self._flap_thread is not None
            self._flap_thread.join(10)
            self._flap_stop = self._flap_thread = None

    def captured(self) -> list[bytes]:
        with self._lock:
            return [bytes(b) for b in self._captured]

    # -- plumbing -----------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                if self._listener is not listener:
                    return
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _abort(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    _abort(client)
                    _abort(upstream)
                    return
                self._conns.update((client, upstream))
                self.connections += 1
                cap = bytearray()
                self._captured.append(cap)
            state: dict[str, Any] = {"drop": False}
            threading.Thread(
                target=self._pump, args=(client, upstream, True, state, cap), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, False, state, cap), daemon=True
            ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, upward: bool, state: dict, cap: bytearray
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self._delay_s:
                    # the injected link latency (delay()): a slow link is what the sync tests
                    # exercise, so this sleep is the fault itself, not a wait for anything
                    time.sleep(self._delay_s)
                if upward:
                    cap.extend(data)
                    data = self._maybe_tamper(data, state)
                    if b"HTTP/1.1\r\n" in data[:200]:  # a new request starts on this connection
                        with self._lock:
                            if self._drop_responses > 0:
                                self._drop_responses -= 1
                                state["drop"] = True
                elif state["drop"]:
                    # the request reached the server; its answer never reaches the client
                    with self._lock:
                        self.responses_dropped += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            _abort(src)
            _abort(dst)

    def _maybe_tamper(self, data: bytes, state: dict) -> bytes:
        if b"HTTP/1.1\r\n" in data[:200] and b"POST " in data[:8]:
            with self._lock:
                if self._tamper > 0:
                    self._tamper -= 1
                    state["tamper"] = True
        if state.get("tamper") and b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            if body:
                state["tamper"] = False
                b = bytearray(body)
                b[-1] ^= 0x01
                with self._lock:
                    self.requests_tampered += 1
                return head + b"\r\n\r\n" + bytes(b)
        elif state.get("tamper") and data and not data.startswith(b"POST "):
            state["tamper"] = False
            b = bytearray(data)
            b[-1] ^= 0x01
            with self._lock:
                self.requests_tampered += 1
            return bytes(b)
        return data


def _abort(s: socket.socket) -> None:
    # shutdown() first: it wakes a thread blocked in recv() on this socket, which a bare
    # close() would not (the peer would then see nothing until its own timeout).
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
