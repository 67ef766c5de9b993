"""edgepipe-cloud: device credentials and serving, as separate processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _cloud_client import DeviceClient, make_batch, pg_schema_url, series_readings
from _pki import TestCA

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=60,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_devices_add_list_remove(tmp_path: Path, kind: str) -> None:
    def run(db: str) -> None:
        added = cli("devices", "--db", db, "add", "pump-7")
        assert added.returncode == 0, added.stderr
        secret = added.stdout.strip()
        assert len(bytes.fromhex(secret)) == 32
        again = cli("devices", "--db", db, "add", "pump-7")
        assert again.returncode == 1 and "already exists" in again.stderr
        assert secret not in again.stdout + again.stderr
        listed = cli("devices", "--db", db, "list")
        assert listed.returncode == 0
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [r["name"] for r in rows] == ["pump-7"]
        assert secret not in listed.stdout
        assert cli("devices", "--db", db, "remove", "pump-7").returncode == 0
        gone = cli("devices", "--db", db, "remove", "pump-7")
        assert gone.returncode == 1 and "no device" in gone.stderr
        assert cli("devices", "--db", db, "list").stdout == ""

    if kind == "sqlite":
        run(f"sqlite:///{tmp_path / 'cloud.db'}")
    else:
        with pg_schema_url() as url:
            run(url)


def test_bad_device_name_and_settings(tmp_path: Path) -> None:
    r = cli("devices", "--db", f"sqlite:///{tmp_path / 'c.db'}", "add", "bad name/..")
    assert r.returncode == 2 and "device names" in r.stderr
    r = cli("serve", "--db", f"sqlite:///{tmp_path / 'c.db'}", "--tls-cert", "x.pem")
    assert r.returncode == 2 and "tls_cert and tls_key" in r.stderr


def test_serve_from_environment(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    secret = bytes.fromhex(cli("devices", "--db", db, "add", "gw-1").stdout.strip())
    port = free_port()
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "EDGEPIPE_CLOUD_DB": db,
        "EDGEPIPE_CLOUD_API_TOKEN": "tok-123",
        "EDGEPIPE_CLOUD_PORT": str(port),
        "EDGEPIPE_CLOUD_MAX_BODY_MB": "0.5",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloud.cli", "serve", "--host", "127.0.0.1"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/v1/ping").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        dev = DeviceClient(url, "gw-1", secret)
        assert dev.upload([make_batch(1, series_readings(4))]).json()["acked"] == [1]
        assert dev.upload([make_batch(2, series_readings(4))], secret=b"w" * 32).status_code == 401
        big = dev.post_raw(b"\0" * (600 * 1024), encoding="identity")
        assert big.status_code == 413  # --max-body-mb from the environment
        r = httpx.get(url + "/v1/devices", headers={"Authorization": "Bearer tok-123"})
        assert r.json()["devices"][0]["today"]["readings"] == 4
        dev.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    text = log.read_text()
    assert secret.hex() not in text and "tok-123" not in text
    assert proc.returncode == 0, text


def test_serve_tls(tmp_path: Path) -> None:
    import ssl

    ca = TestCA(tmp_path)
    cert, key = ca.issue("server")
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloud.cli",
                "serve",
                "--db",
                f"sqlite:///{tmp_path / 'c.db'}",
                "--port",
                str(port),
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        ctx = ssl.create_default_context(cafile=str(ca.path))
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/v1/ping", verify=ctx)
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        assert r.status_code == 200 and r.json() == {"ok": True}
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/v1/ping")  # plain HTTP is not served
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
