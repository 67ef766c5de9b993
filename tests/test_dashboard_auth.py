"""Dashboard authentication and JSON endpoints over real HTTP (uvicorn on loopback, real
SQLite file): sign-in with CSRF, cookie flags, rate limiting, sign-out revoking the session,
the separation of device and operator credentials, and the chart buckets."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud import Backend, Settings, create_app, open_backend
from cloud._auth import LoginLimiter, hash_password
from cloud._settings import DashboardSettings
from cloud._ui_api import chart_window
from tests.helpers.cloud_client import (
    DeviceClient,
    LiveServer,
    make_batch,
    new_device,
    new_master_key,
)

PASSWORD = "a long enough password"
TOKEN = "api-token-for-scripts"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    path = tmp_path_factory.mktemp("dash-auth") / "cloud.db"
    with open_backend(f"sqlite:///{path}", master_key=new_master_key()) as b:
        b.add_operator("alice", hash_password(PASSWORD))
        yield b


def _server(backend: Backend, **dash: object) -> LiveServer:
    settings = Settings(api_token=TOKEN)
    return LiveServer(
        create_app(settings, backend=backend, dashboard=DashboardSettings(**dash))  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def server(backend: Backend) -> Iterator[LiveServer]:
    with _server(backend, login_max_failures=5, login_window_s=300) as s:
        yield s


def _csrf(client: httpx.Client) -> str:
    r = client.get("/login")
    assert r.status_code == 200
    return re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)  # type: ignore[union-attr]


def _login(client: httpx.Client, name: str = "alice", password: str = PASSWORD) -> httpx.Response:
    token = _csrf(client)
    return client.post("/login", data={"username": name, "password": password, "csrf": token})


@pytest.fixture
def operator(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = _login(c)
        assert r.status_code == 303, r.text
        yield c


def test_pages_need_a_session(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        r = c.get("/devices/x?range=1h")
        assert r.status_code == 303
        assert r.headers["location"] == "/login?next=%2Fdevices%2Fx%3Frange%3D1h"
        for path in ("/ui/api/fleet", "/ui/api/logs", "/v1/devices"):
            assert c.get(path).status_code == 401, path


def test_login_sets_a_hardened_session_cookie(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        r = _login(c)
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("ep_session="))
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback
        assert c.get("/").status_code == 200
        assert c.get("/ui/api/fleet").json()["devices"] is not None
        assert c.get("/v1/devices").status_code == 200  # the read API accepts the session too
        page = c.get("/")
        assert "Content-Security-Policy" in page.headers
        assert 'name="viewport"' in page.text


def test_secure_cookie_flag(backend: Backend) -> None:
    with _server(backend, secure_cookies=True) as s:
        form = httpx.get(s.url + "/login")
        csrf_cookie = form.headers["set-cookie"]
        assert "Secure" in csrf_cookie and "HttpOnly" in csrf_cookie
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
        # (a browser would only send the Secure cookie back over TLS; send it by hand)
        r = httpx.post(
            s.url + "/login",
            data={"username": "alice", "password": PASSWORD, "csrf": token},
            headers={"Cookie": f"ep_csrf={token}"},
        )
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("ep_session="))
        assert "Secure" in cookie and "HttpOnly" in cookie


def test_login_needs_the_csrf_token_and_same_origin(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        _csrf(c)
        r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": "forged"})
        assert r.status_code == 403 and "ep_session" not in r.headers.get("set-cookie", "")
        token = _csrf(c)
        r = c.post(
            "/login",
            data={"username": "alice", "password": PASSWORD, "csrf": token},
            headers={"Origin": "https://evil.example"},
        )
        assert r.status_code == 403
        with httpx.Client(base_url=server.url) as fresh:  # no CSRF cookie at all
            r = fresh.post(
                "/login", data={"username": "alice", "password": PASSWORD, "csrf": token}
            )
            assert r.status_code == 403


def test_wrong_password_and_unknown_user_look_the_same(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        a = _login(c, password="wrong password")
        b = _login(c, name="mallory", password="wrong password")
        assert a.status_code == b.status_code == 401
        assert "Wrong user name or password" in a.text and "Wrong user name or password" in b.text


def test_logout_needs_csrf_and_revokes_the_session(operator: httpx.Client) -> None:
    cookie = operator.cookies["ep_session"]
    assert operator.post("/logout", data={"csrf": "nope"}).status_code == 403
    assert operator.get("/ui/api/fleet").status_code == 200  # still signed in
    page = operator.get("/").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    r = operator.post("/logout", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    # The old cookie value is dead server-side, even if a client kept it.
    with httpx.Client(base_url=str(operator.base_url), cookies={"ep_session": cookie}) as c:
        assert c.get("/ui/api/fleet").status_code == 401
        assert c.get("/").status_code == 303


def test_removing_an_operator_ends_their_sessions(backend: Backend, server: LiveServer) -> None:
    backend.add_operator("bob", hash_password(PASSWORD))
    with httpx.Client(base_url=server.url) as c:
        assert _login(c, "bob").status_code == 303
        assert c.get("/ui/api/fleet").status_code == 200
        assert backend.remove_operator("bob")
        assert c.get("/ui/api/fleet").status_code == 401


def test_login_rate_limit_per_address(backend: Backend) -> None:
    backend.add_operator("carol", hash_password(PASSWORD))
    with (
        _server(backend, login_max_failures=3, login_window_s=60) as s,
        httpx.Client(base_url=s.url) as c,
    ):
        for name in ("carol", "dave", "erin"):  # different names, one address
            assert _login(c, name, "bad password").status_code == 401
        r = _login(c, "carol", PASSWORD)  # even the right password waits now
        assert r.status_code == 429
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert "Too many failed sign-ins" in r.text
        assert "ep_session" not in r.headers.get("set-cookie", "")


def test_login_limiter_per_user_and_window() -> None:
    lim = LoginLimiter(max_failures=5, window_s=300)
    for i in range(5):
        assert lim.retry_after(["ip:a", "user:x"], now=100 + i) is None
        lim.failed([f"ip:{i}", "user:x"], now=100 + i)  # five addresses, one user
    assert lim.retry_after(["ip:new", "user:x"], now=110) == 290
    assert lim.retry_after(["ip:new", "user:y"], now=110) is None
    assert lim.retry_after(["user:x"], now=400.5) is None  # the first failure aged out
    lim.succeeded("user:x")
    assert lim.retry_after(["user:x"], now=110) is None


def test_device_credentials_do_not_open_the_dashboard(backend: Backend, server: LiveServer) -> None:
    name, secret = new_device(backend, "sep")
    from protocol import _signing

    for path in ("/v1/devices", "/ui/api/fleet", f"/v1/devices/{name}"):
        headers = _signing.signed_headers(secret, name, path, b"", timestamp=int(time.time()))
        r = httpx.get(server.url + path, headers=headers)
        assert r.status_code == 401, path
        r = httpx.get(server.url + path, headers={"Authorization": f"Bearer {secret.hex()}"})
        assert r.status_code == 401, path
    r = httpx.get(server.url + "/", headers={"Authorization": f"Bearer {secret.hex()}"})
    assert r.status_code == 303  # to the login page


def test_an_operator_session_cannot_upload(
    backend: Backend, server: LiveServer, operator: httpx.Client
) -> None:
    name, secret = new_device(backend, "up")
    dev = DeviceClient(server.url, name, secret)
    body = dev.body([make_batch(1, [("s", "m", None, 1_700_000_000_000, 1.0, 0)])])
    dev.close()
    r = operator.post(
        "/v1/batches",
        content=body,
        headers={
            "Content-Type": "application/vnd.edgepipe.batches+msgpack",
            "Content-Encoding": "identity",
            "X-Edgepipe-Device": name,
            "Authorization": f"Bearer {TOKEN}",
        },
    )
    assert r.status_code == 401
    assert backend.count_readings(name) == 0


def test_series_buckets_fill_empty_ones_with_null(
    backend: Backend, server: LiveServer, operator: httpx.Client
) -> None:
    name, secret = new_device(backend, "chart")
    now = int(time.time() * 1000)
    ts = [now - 600_000 + i * 10_000 for i in range(30)] + [
        now - 60_000 + i * 10_000 for i in range(5)
    ]
    dev = DeviceClient(server.url, name, secret)
    try:
        batch = make_batch(1, [("s1", "temp", None, t, float(i), 0) for i, t in enumerate(ts)])
        assert dev.upload([batch]).status_code == 200
    finally:
        dev.close()
    s = operator.get(
        "/ui/api/series", params={"device": name, "metric": "temp", "range": "15m"}
    ).json()
    assert s["step"] == 1000 and len(s["ts"]) == len(s["avg"]) == len(s["count"]) <= 1000
    assert sum(s["count"]) == 35
    assert sum(v is not None for v in s["avg"]) == 35
    i = (now - 200_000 - s["since"]) // s["step"]  # inside the silent stretch
    assert s["avg"][i] is None and s["count"][i] == 0
    year = operator.get(
        "/ui/api/series", params={"device": name, "metric": "temp", "range": "1y"}
    ).json()
    assert year["step"] % 3_600_000 == 0 and len(year["ts"]) <= 1000
    assert sum(year["count"]) == 35
    bad = operator.get("/ui/api/series", params={"device": name, "metric": "temp", "range": "2w"})
    assert bad.status_code == 400
    missing = operator.get("/ui/api/series", params={"device": "nope", "metric": "temp"})
    assert missing.status_code == 404
    fleet = operator.get("/ui/api/fleet", params={"device": name}).json()["devices"][0]
    assert fleet["online"] and fleet["newest_ts"] == max(ts) and fleet["today"]["readings"] == 35


def test_chart_window_is_aligned_and_bounded() -> None:
    for span in (60_000, 900_000, 86_400_000, 30 * 86_400_000, 365 * 86_400_000):
        since, until, step = chart_window(1_700_000_123_456 - span, 1_700_000_123_456)
        assert since % step == 0 and until % step == 0
        assert (until - since) // step <= 902
        if step >= 3_600_000:
            assert step % 3_600_000 == 0  # served from the hourly rollup


def test_users_cli(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'users.db'}"
    cli = [sys.executable, "-c", "import sys; from cloud.cli import main; sys.exit(main())"]

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, "users", "--db", db, *args], input=stdin, capture_output=True, text=True
        )

    missing = run("add", "ops", "--password-stdin", stdin=PASSWORD + "\n")
    assert missing.returncode == 2 and "edgepipe-cloud init" in missing.stderr
    assert not (tmp_path / "users.db").exists()
    init = subprocess.run([*cli, "init", "--db", db], capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    assert run("add", "ops", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    again = run("add", "ops", "--password-stdin", stdin=PASSWORD + "\n")
    assert again.returncode == 1 and "already exists" in again.stderr
    short = run("add", "ops2", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "at least 8" in short.stderr
    assert '"name": "ops"' in run("list").stdout
    with open_backend(db) as b:
        stored = b.operator_hash("ops")
        assert stored is not None and stored.startswith("$argon2id$") and PASSWORD not in stored
    assert run("remove", "ops").returncode == 0
    assert run("remove", "ops").returncode == 1
