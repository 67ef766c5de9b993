"""The receiver authenticates before it spends: slow or forged uploads hold nothing shared,
logins cannot outrun their limit nor delay uploads, refused floods write nothing, and every
answer carries the security headers (real uvicorn on loopback, real SQLite files)."""

from __future__ import annotations

import concurrent.futures
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud import Backend, Settings, create_app, open_backend
from cloud._auth import PasswordChecker, hash_password, verify_password
from cloud._settings import DashboardSettings
from core._clock import ManualClock
from protocol import _signing
from tests.helpers.cloud_client import (
    PATH,
    DeviceClient,
    LiveServer,
    encode,
    make_batch,
    new_device,
    new_master_key,
    series_readings,
)
from tests.helpers.edge import wait_for

TOKEN = "operator-token-for-hardening"
PASSWORD = "a long enough password"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    path = tmp_path_factory.mktemp("hardening") / "cloud.db"
    with open_backend(f"sqlite:///{path}", master_key=new_master_key()) as b:
        b.add_operator("alice", hash_password(PASSWORD))
        yield b


def _operator(server: LiveServer) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    )


def _status(op: httpx.Client) -> dict:
    r = op.get("/v1/receiver")
    assert r.status_code == 200, r.text
    return r.json()


def _raw_request(port: int, headers: dict[str, str], first: bytes = b"") -> socket.socket:
    """Send a request's headers (and ``first`` body bytes) and keep the socket open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    lines = [f"POST {PATH} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + first)
    return s


def _answer_status(s: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    m = re.match(rb"HTTP/1\.1 (\d{3})", data)
    assert m, data[:200]
    return int(m.group(1))


class _HeldVerifier:
    """A password verifier that holds every check until the test releases it (then checks
    for real), counting the checks that entered it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def __call__(self, pwhash: str | None, password: str) -> bool:
        with self._lock:
            self.entered += 1
        assert self.release.wait(120), "the test never released the password checks"
        return verify_password(pwhash, password)


def _wrong_login(url: str, user: str, source: str) -> int:
    """One sign-in with a wrong password from loopback address ``source``.  No form page
    is needed: the CSRF check is a double submit (any token as both cookie and field)."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=url, timeout=120, transport=transport) as c:
        token = secrets.token_hex(16)
        c.cookies.set("ep_csrf", token)
        r = c.post(
            "/login",
            data={"username": user, "password": "wrong guess", "csrf": token},
            headers={"Origin": url},
        )
        return r.status_code


@pytest.mark.parametrize("spread", [False, True], ids=["one_user", "many_users_and_addresses"])
def test_concurrent_logins_check_at_most_the_limit_and_uploads_go_on(
    backend: Backend, spread: bool
) -> None:
    """100 concurrent sign-ins: for one user from one address, the limiter lets through
    its 5 attempts; for 100 users from 100 addresses it lets all through and the password
    pool (1 thread, 8 waiting) takes 9 and refuses 91.  While every check is held on the
    pool's thread, a genuine upload completes: argon2 cannot delay it."""
    dash = DashboardSettings(login_max_failures=5, login_window_s=300)
    assert (dash.login_check_workers, dash.login_check_queue) == (1, 8)  # the defaults
    name, secret = new_device(backend)
    app = create_app(Settings(api_token=TOKEN), backend=backend, dashboard=dash)
    held = _HeldVerifier()
    app.state.password_checker.close()
    app.state.password_checker = PasswordChecker(
        dash.login_check_workers, dash.login_check_queue, verifier=held
    )
    admitted = 9 if spread else 5  # pool places, or the limiter's allowance
    with LiveServer(app) as server, _operator(server) as op:
        dev = DeviceClient(server.url, name, secret)
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            try:
                logins = [
                    pool.submit(
                        _wrong_login,
                        server.url,
                        f"user-{i}" if spread else "alice",
                        f"127.0.1.{i + 1}" if spread else "127.0.0.1",
                    )
                    for i in range(100)
                ]
                # Every attempt beyond what is admitted is answered at once (429) ...
                wait_for(lambda: sum(f.done() for f in logins) == 100 - admitted, 120, "refusals")
                # ... while the admitted ones wait: one in the verifier, the rest queued.
                st = _status(op)["logins"]
                assert st["pending"] == admitted and held.entered == 1, st
                upload = dev.upload([make_batch(1, series_readings(3))])
                assert upload.status_code == 200, upload.text
                assert held.entered == 1 and not any(
                    logins[i].done() and logins[i].result() != 429 for i in range(100)
                )
            finally:
                held.release.set()
            codes = [f.result() for f in logins]
        st = _status(op)["logins"]
        assert st["password_checks"] == held.entered == admitted <= (9 if spread else 5)
        assert codes.count(401) == admitted and codes.count(429) == 100 - admitted, codes
        assert st["overflow"] == (91 if spread else 0) and st["pending"] == 0, st
        assert backend.count_readings(name) == 3
        dev.close()


def test_a_third_concurrent_upload_of_one_device_is_refused_and_others_go_on(
    backend: Backend,
) -> None:
    settings = Settings(api_token=TOKEN)
    assert settings.max_inflight_per_device == 2  # the default
    name, secret = new_device(backend)
    other, other_secret = new_device(backend)
    with LiveServer(create_app(settings, backend=backend)) as server, _operator(server) as op:
        dev = DeviceClient(server.url, name, secret)
        # Two genuine uploads of the device, authenticated from their headers, bodies pending.
        held = []
        for seq in (1, 2):
            body = encode(dev.body([make_batch(seq, series_readings(2))]), "zstd")
            h = _signing.signed_headers_v2(
                secret, name, PATH, body, timestamp=int(time.time()), encoding="zstd"
            )
            held.append((_raw_request(server.port, h | {"Content-Length": str(len(body))}), body))
        wait_for(lambda: _status(op)["uploads"]["reading_bodies"] == 2, 60, "2 uploads held")
        assert _status(op)["uploads"]["devices_in_flight"] == 1

        third = dev.upload([make_batch(3, series_readings(2))])
        assert third.status_code == 429, third.text
        assert third.json()["error"] == "busy"
        assert "already has 2 uploads in progress" in third.json()["detail"]
        assert third.headers["Retry-After"] == str(settings.retry_after_s)
        # Another device is not affected.
        with DeviceClient(server.url, other, other_secret) as c:
            assert c.upload([make_batch(1, series_readings(2))]).status_code == 200

        for s, body in held:
            s.sendall(body)
        assert [_answer_status(s) for s, _ in held] == [200, 200]
        # Its places are free again: the refused upload goes through when retried.
        assert dev.upload([make_batch(3, series_readings(2))]).status_code == 200
        assert backend.count_readings(name) == 6
        assert _status(op)["uploads"]["refused_unauthenticated"]["busy"] == 1
        dev.close()


def test_a_burst_beyond_the_device_rate_is_refused_until_the_clock_moves_on(
    backend: Backend,
) -> None:
    settings = Settings(api_token=TOKEN)
    rate, burst = settings.device_uploads_per_s, settings.device_upload_burst
    assert (rate, burst) == (20, 40)  # the defaults
    clock = ManualClock()
    name, secret = new_device(backend)
    other, other_secret = new_device(backend)
    app = create_app(settings, backend=backend, clock=clock)
    with LiveServer(app) as server, DeviceClient(server.url, name, secret) as dev:
        seq = iter(range(1, 1000))

        def upload(c: DeviceClient = dev) -> httpx.Response:
            return c.upload([make_batch(next(seq), series_readings(1))])

        # The clock stands still: the burst passes, the next upload is refused.
        assert [upload().status_code for _ in range(burst)] == [200] * burst
        refused = upload()
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == "rate_limited"
        assert refused.headers["Retry-After"] == "1"  # 1/20 s, rounded up to whole seconds
        with DeviceClient(server.url, other, other_secret) as c:
            assert upload(c).status_code == 200  # another device has its own bucket
        # 1/20 s later: one more; then a second later: 20 more, and the 21st is refused.
        clock.advance(1 / rate)
        assert [upload().status_code for _ in range(2)] == [200, 429]
        clock.advance(1.0)
        codes = [upload().status_code for _ in range(int(rate) + 1)]
        assert codes == [200] * int(rate) + [429]
        assert backend.count_readings(name) == burst + 1 + int(rate)


def test_unknown_device_and_bad_signature_get_identical_answers(backend: Backend) -> None:
    name, secret = new_device(backend)
    with LiveServer(create_app(Settings(api_token=TOKEN), backend=backend)) as server:
        body = encode(DeviceClient(server.url, name, secret).body([]), "zstd")
        answers = []
        for device, key in ((name, b"w" * 32), ("no-such-device-" + name, b"w" * 32)):
            for version in (1, 2):
                c = DeviceClient(server.url, device, key, version=version)
                r = c.post_raw(body, nonce="ef" * 16, timestamp=int(time.time()))
                answers.append((r.status_code, r.content, r.headers.get("content-type")))
                c.close()
        assert answers[0][0] == 401 and len(set(answers)) == 1, answers


def test_refused_floods_change_neither_the_rejection_log_nor_last_error(
    backend: Backend,
) -> None:
    name, secret = new_device(backend)
    with LiveServer(create_app(Settings(api_token=TOKEN), backend=backend)) as server:
        op = _operator(server)
        dev = DeviceClient(server.url, name, secret)
        stale = dev.upload([make_batch(1, series_readings(1))], timestamp=int(time.time()) - 9999)
        assert stale.status_code == 401 and stale.json()["error"] == "stale"
        log_before = op.get("/v1/rejections", params={"limit": 1000}).json()["rejections"]
        device_before = op.get(f"/v1/devices/{name}").json()
        assert device_before["last_error"].startswith("stale")
        refused_before = _status(op)["uploads"]["refused_unauthenticated_total"]

        sent = encode(dev.body([make_batch(1, series_readings(1))]), "zstd")
        evil = "attacker-text " * 20
        n = 0
        for i in range(40):
            # wrong secret (v2 and v1), a tampered link or encoding, a body not the one signed
            for version in (1, 2):
                forger = DeviceClient(server.url, name, os.urandom(32), version=version)
                r = forger.post_raw(
                    sent, link=evil[:30].strip(), headers={"User-Agent": evil.strip()}
                )
                assert r.status_code == 401
                forger.close()
                n += 1
            r = dev.post_raw(sent, headers={"X-Edgepipe-Link": "cellular"})
            r2 = dev.post_raw(sent, signed_body=sent + b"!")
            r3 = DeviceClient(server.url, f"ghost-{i}", b"g" * 32).post_raw(sent)
            assert {r.status_code, r2.status_code, r3.status_code} == {401}
            n += 3
        assert op.get("/v1/rejections", params={"limit": 1000}).json()["rejections"] == log_before
        after = op.get(f"/v1/devices/{name}").json()
        assert after["last_error"] == device_before["last_error"]
        assert after["last_error_ms"] == device_before["last_error_ms"]
        assert _status(op)["uploads"]["refused_unauthenticated_total"] - refused_before == n
        # The genuine device still gets through, once.
        assert dev.upload([make_batch(1, series_readings(1))]).status_code == 200
        assert backend.count_readings(name) == 1
        dev.close()
        op.close()


def test_every_answer_carries_no_store_and_nosniff(backend: Backend) -> None:
    name, secret = new_device(backend)
    with LiveServer(create_app(Settings(api_token=TOKEN), backend=backend)) as server:
        dev = DeviceClient(server.url, name, secret)
        op = _operator(server)
        answers = [
            httpx.get(server.url + "/v1/ping"),
            httpx.get(server.url + "/v1/devices"),  # 401
            op.get("/v1/devices"),
            op.get("/openapi.json"),
            op.get("/v1/nowhere"),  # 404
            dev.upload([make_batch(1, series_readings(1))]),
            dev.upload([make_batch(2, series_readings(1))], secret=b"q" * 32),  # 401
            httpx.get(server.url + "/login"),
        ]
        for r in answers:
            assert r.headers.get("cache-control") == "no-store", (r.url, r.headers)
            assert r.headers.get("x-content-type-options") == "nosniff", r.url
        assert [r.status_code for r in answers[:2]] == [200, 401]
        dev.close()
        op.close()


def test_the_database_is_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "cloud.db"
        with open_backend(f"sqlite:///{path}", master_key=new_master_key()) as b:
            b.add_operator("bob", hash_password(PASSWORD))
            files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            assert all(f.exists() for f in files)
            modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
        assert modes == {f.name: 0o600 for f in files}
    finally:
        os.umask(old)


def test_v1_can_be_refused_and_v2_covers_how_the_body_is_read(backend: Backend) -> None:
    name, secret = new_device(backend)
    settings = Settings(api_token=TOKEN, accept_v1_signatures=False)
    with LiveServer(create_app(settings, backend=backend)) as server:
        old = DeviceClient(server.url, name, secret, version=1)
        r = old.upload([make_batch(1, series_readings(1))])
        assert r.status_code == 401 and "version 1" in r.json()["detail"]
        dev = DeviceClient(server.url, name, secret, encoding="identity")
        sent = dev.body([make_batch(1, series_readings(1))])
        for changed in (
            {"Content-Encoding": "gzip"},
            {"X-Edgepipe-Link": "ethernet"},
            {"Content-Type": _signing.CONTENT_TYPE + "; charset=x"},
        ):
            r = dev.post_raw(sent, encoding="identity", headers=changed)
            assert r.status_code == 401 and r.json()["error"] == "bad_signature", changed
        assert dev.post_raw(sent, encoding="identity").status_code == 200
        old.close()
        dev.close()
