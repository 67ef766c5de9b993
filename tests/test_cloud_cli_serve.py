"""edgepipe-cloud as separate processes: device credentials on both backends, ``serve``
configured from the environment and over TLS, the master key (generated, required, rotated
while serving)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers.cloud_cli import REPO, cli, free_port, key_file, start_serve
from tests.helpers.cloud_client import (
    DeviceClient,
    make_batch,
    pg_schema_url,
    series_readings,
    wait_serving,
)
from tests.helpers.pki import TestCA


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_devices_add_list_remove(tmp_path: Path, kind: str) -> None:
    key = str(key_file(tmp_path))

    def run(db: str) -> None:
        missing = cli("devices", "--db", db, "list")
        assert missing.returncode == 2 and "no edgepipe-cloud database" in missing.stderr
        assert cli("init", "--db", db).returncode == 0
        added = cli("devices", "--db", db, "--master-key-file", key, "add", "pump-7")
        assert added.returncode == 0, added.stderr
        secret = added.stdout.strip()
        assert len(bytes.fromhex(secret)) == 32
        again = cli("devices", "--db", db, "--master-key-file", key, "add", "pump-7")
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
    key = {"EDGEPIPE_CLOUD_MASTER_KEY": cli("master-key", "generate").stdout}  # the key itself
    assert cli("init", "--db", db, env=key).returncode == 0
    secret = bytes.fromhex(cli("devices", "--db", db, "add", "gw-1", env=key).stdout.strip())
    port = free_port()
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        **key,
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
        wait_serving(proc, url, log)
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
    text = log.read_text()  # what the operator's log collector keeps: never a secret
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
                "--master-key-file",
                str(key_file(tmp_path)),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        ctx = ssl.create_default_context(cafile=str(ca.path))
        r = wait_serving(proc, f"https://127.0.0.1:{port}", log, verify=ctx)
        assert r.status_code == 200 and r.json() == {"ok": True}
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/v1/ping")  # plain HTTP is not served
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)


def test_master_key_generate(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    kid, material = path.read_text().split()
    again = cli("master-key", "generate", "--out", str(path))
    assert again.returncode == 1 and "not overwriting" in again.stderr
    assert path.read_text().split() == [kid, material]
    assert cli("master-key", "generate").stdout.split()[1] != material


def test_serve_refuses_a_missing_or_wrong_master_key(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    right, wrong = key_file(tmp_path, "right.key"), key_file(tmp_path, "wrong.key")
    assert cli("init", "--db", db).returncode == 0
    added = cli("devices", "--db", db, "add", "gw-1")
    assert added.returncode == 2 and "no master key configured" in added.stderr
    assert (
        cli("devices", "--db", db, "--master-key-file", str(right), "add", "gw-1").returncode == 0
    )
    before = (tmp_path / "cloud.db").read_bytes()
    r = cli("serve", "--db", db, "--port", str(free_port()))
    assert r.returncode == 2 and "no master key configured" in r.stderr
    assert "master-key generate" in r.stderr
    r = cli("serve", "--db", db, "--port", str(free_port()), "--master-key-file", str(wrong))
    assert r.returncode == 2 and "wrong master key" in r.stderr and "Traceback" not in r.stderr
    right.chmod(0o644)
    r = cli("serve", "--db", db, "--port", str(free_port()), "--master-key-file", str(right))
    assert r.returncode == 2 and "chmod 600" in r.stderr
    assert (tmp_path / "cloud.db").read_bytes() == before  # nothing was written


def test_rotation_while_serving(tmp_path: Path) -> None:
    """A receiver started before the rotation keeps authenticating the devices afterwards
    (it picks up the new key line from its file), and one started after it too."""
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    key = key_file(tmp_path)
    env = {"EDGEPIPE_CLOUD_DB": db, "EDGEPIPE_CLOUD_MASTER_KEY_FILE": str(key)}
    assert cli("init", env=env).returncode == 0
    secret = bytes.fromhex(cli("devices", "add", "gw-1", env=env).stdout.strip())
    old_id = key.read_text().split()[0]
    proc, url, log = start_serve(tmp_path, "--host", "127.0.0.1", env=env)
    try:
        dev = DeviceClient(url, "gw-1", secret)
        assert dev.upload([make_batch(1, series_readings(2))]).json()["acked"] == [1]
        r = cli("master-key", "rotate", env=env)
        assert r.returncode == 0, r.stderr
        assert "re-sealed 1 device secret" in r.stderr and old_id in r.stderr
        lines = key.read_text().splitlines()
        assert len(lines) == 2 and lines[0].split()[0] == old_id
        assert key.stat().st_mode & 0o777 == 0o600
        assert dev.upload([make_batch(2, series_readings(2))]).json()["acked"] == [2]
        dev.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    key.write_text(lines[1] + "\n")  # the old line is no longer needed
    proc, url, log = start_serve(tmp_path, "--host", "127.0.0.1", env=env)
    try:
        dev = DeviceClient(url, "gw-1", secret)
        assert dev.upload([make_batch(3, series_readings(2))]).json()["acked"] == [3]
        dev.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    assert secret.hex() not in log.read_text()  # the served log never shows a device secret


def test_rotate_needs_a_changeable_key(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    env = {
        "EDGEPIPE_CLOUD_DB": db,
        "EDGEPIPE_CLOUD_MASTER_KEY": cli("master-key", "generate").stdout,
    }
    assert cli("init", env=env).returncode == 0
    assert cli("devices", "add", "gw-1", env=env).returncode == 0
    r = cli("master-key", "rotate", env=env)
    assert r.returncode == 2 and "--keep-key" in r.stderr
    env["EDGEPIPE_CLOUD_MASTER_KEY"] += cli("master-key", "generate").stdout
    r = cli("master-key", "rotate", "--keep-key", env=env)
    assert r.returncode == 0 and "re-sealed 1 device secret" in r.stderr
