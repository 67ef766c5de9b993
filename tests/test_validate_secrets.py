"""``edgepipe validate`` resolves every secret and file ``pipeline.yaml`` names, the way
``run`` does, and ``run`` refuses the same configs with the same located message and exit
code 2 -- never a traceback, and nothing opened, connected or written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools._mosquitto import free_port
from tests.helpers.edge import REPO

SECRET = "ab" * 32  # what `edgepipe-cloud devices add` prints: 32 bytes as hex


def edgepipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**clean, "PYDANTIC_DISABLE_PLUGINS": "__all__", **(env or {})},
    )


def at(path: Path, text: str) -> str:
    """``LINE:COL`` (1-based) of the first occurrence of ``text`` in the file."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if text in line:
            return f"{i}:{line.index(text) + 1}"
    raise AssertionError(f"{text!r} not in {path}")


def example(tmp_path: Path, keyfile: Path) -> Path:
    """The README's example pipeline.yaml with its store, key and module paths adjusted
    (and no broker: nothing here may connect)."""
    text = (REPO / "pipeline.yaml").read_text()
    text = text.replace("/var/lib/edgepipe/store.db", str(tmp_path / "store.db"))
    text = text.replace("/etc/edgepipe/store.key", str(keyfile))
    text = text.replace("filters/lib/", f"{REPO}/filters/lib/")
    text = text.replace("port: 1883", f"port: {free_port()}")
    assert str(keyfile) in text and str(tmp_path / "store.db") in text
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def refused(cfg: Path, says: str, env: dict[str, str] | None = None) -> None:
    """``validate`` and ``run`` both refuse ``cfg`` with exit 2 and ``says`` (which starts
    with the location), once, without a traceback, and start nothing."""
    for command in ("validate", "run"):
        r = edgepipe(command, "-c", str(cfg), env=env)
        assert r.returncode == 2, (command, r.stderr)
        assert r.stderr.startswith("edgepipe: "), (command, r.stderr)
        assert says in r.stderr, (command, r.stderr)
        assert r.stderr.count(says) == 1, (command, r.stderr)
        assert "Traceback" not in r.stderr, (command, r.stderr)
        assert not (cfg.parent / "store.db").exists(), command


def test_readme_example_without_the_device_secret_is_refused(tmp_path, keyfile):
    cfg = example(tmp_path, keyfile)
    where = at(cfg, "EDGEPIPE_DEVICE_SECRET}")
    says = (
        f"{cfg}:{where}: sync.device_secret: environment variable EDGEPIPE_DEVICE_SECRET is not set"
    )
    refused(cfg, says)

    r = edgepipe("validate", "-c", str(cfg), env={"EDGEPIPE_DEVICE_SECRET": SECRET})
    assert r.returncode == 0, r.stderr
    assert "ok (2 subscription(s), 3 filter stage(s)" in r.stdout
    assert not (tmp_path / "store.db").exists()  # validate writes nothing


@pytest.mark.parametrize(
    "value, says",
    [
        ("not-hex", "is not the hex string the receiver issued"),
        ("abcd" * 4, "is too short (8 bytes"),
        ("", "is empty"),
    ],
)
def test_device_secret_not_in_the_receivers_format(tmp_path, keyfile, value, says):
    cfg = example(tmp_path, keyfile)
    where = at(cfg, "device_secret:")
    col = int(where.split(":")[1]) + len("device_secret: ")
    refused(
        cfg,
        f"{cfg}:{where.split(':')[0]}:{col}: sync.device_secret: {says}",
        env={"EDGEPIPE_DEVICE_SECRET": value},
    )
    for command in ("validate", "run"):  # the secret itself is never printed
        r = edgepipe(command, "-c", str(cfg), env={"EDGEPIPE_DEVICE_SECRET": "abcd" * 4})
        assert "abcd" * 4 not in r.stderr


def minimal(tmp_path: Path, store: str, rest: str = "") -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "device: {id: d1}\n"
        f"broker: {{host: 127.0.0.1, port: {free_port()}}}\n"
        "subscriptions:\n"
        "  - topic: sensors/{device}/{metric}\n"
        "store:\n"
        f"  path: {tmp_path / 'store.db'}\n"
        f"  key: {store}\n"
        "metrics: {listen: null}\n" + rest
    )
    return path


NO_SYNC = "sync: {enabled: false}\n"


def test_missing_store_key_file(tmp_path):
    cfg = minimal(tmp_path, "{file: nokey.key}", NO_SYNC)
    refused(
        cfg,
        f"{cfg}:{at(cfg, 'nokey.key')}: store.key: cannot read store key file nokey.key: "
        "No such file or directory",
    )


def test_store_key_file_readable_by_others(tmp_path, keyfile):
    keyfile.chmod(0o644)
    cfg = minimal(tmp_path, f"{{file: {keyfile}}}", NO_SYNC)
    refused(
        cfg,
        f"{cfg}:{at(cfg, str(keyfile))}: store.key: store key file {keyfile} is readable by "
        f"group or others (mode 0644); run: chmod 600 {keyfile}",
    )


def test_store_key_from_env_unset_or_not_a_keyring(tmp_path, keyfile):
    cfg = minimal(tmp_path, "{env: EDGEPIPE_STORE_KEY}", NO_SYNC)
    says = "store.key: environment variable EDGEPIPE_STORE_KEY (the store key) is not set"
    refused(cfg, f"{cfg}:{at(cfg, 'EDGEPIPE_STORE_KEY')}: {says}")
    refused(
        cfg,
        f"{cfg}:{at(cfg, 'EDGEPIPE_STORE_KEY')}: store.key: $EDGEPIPE_STORE_KEY: line 1: "
        "a key must be 32 bytes, not 3",
        env={"EDGEPIPE_STORE_KEY": "k1 QUJD"},
    )
    r = edgepipe("validate", "-c", str(cfg), env={"EDGEPIPE_STORE_KEY": keyfile.read_text()})
    assert r.returncode == 0, r.stderr


def test_no_store_key(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "subscriptions:\n  - topic: sensors/{device}/{metric}\n"
        f"store: {{path: {tmp_path / 'store.db'}}}\n" + NO_SYNC
    )
    where = at(path, "{path:")
    refused(path, f"{path}:{where}: store.key: is required")


def test_no_sync_section_means_sync_without_a_secret(tmp_path, keyfile):
    cfg = minimal(tmp_path, f"{{file: {keyfile}}}")
    refused(cfg, f"{cfg}:1:1: sync.device_secret: not set, and sync is enabled (the default)")
    assert "sync.enabled: false" in edgepipe("validate", "-c", str(cfg)).stderr
    # once named, the secret is resolved: a file that is not there
    cfg = minimal(tmp_path, f"{{file: {keyfile}}}", "sync:\n  device_secret: {file: gone}\n")
    refused(
        cfg,
        f"{cfg}:{at(cfg, 'gone')}: sync.device_secret: cannot read secret file gone: "
        "No such file or directory",
    )
    (tmp_path / "secret").write_text(SECRET + "\n")
    cfg = minimal(
        tmp_path,
        f"{{file: {keyfile}}}",
        f"sync:\n  device_secret: {{file: {tmp_path / 'secret'}}}\n",
    )
    assert edgepipe("validate", "-c", str(cfg)).returncode == 0


def test_every_problem_is_reported_in_file_order(tmp_path):
    cfg = minimal(
        tmp_path,
        "{file: nokey.key}",
        "sync:\n  device_secret: {env: EDGEPIPE_DEVICE_SECRET}\n"
        f"  ca_file: {tmp_path / 'no-ca.pem'}\n",
    )
    r = edgepipe("validate", "-c", str(cfg))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert lines == [
        f"edgepipe: {cfg}:{at(cfg, 'nokey.key')}: store.key: cannot read store key file "
        "nokey.key: No such file or directory",
        f"{cfg}:{at(cfg, 'EDGEPIPE_DEVICE_SECRET')}: sync.device_secret: environment "
        "variable EDGEPIPE_DEVICE_SECRET is not set",
        f"{cfg}:{at(cfg, str(tmp_path / 'no-ca.pem'))}: sync.ca_file: cannot read sync.ca_file "
        f"{tmp_path / 'no-ca.pem'}: No such file or directory",
    ], r.stderr


def test_broker_password_and_tls_files(tmp_path, keyfile):
    pw = tmp_path / "mqtt-password"
    broker = (
        "broker:\n"
        f"  port: {free_port()}\n"
        "  username: edge\n"
        f"  password: {{file: {pw}}}\n"
        f"  tls: {{ca_file: {tmp_path / 'ca.pem'}}}\n"
    )
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "subscriptions:\n  - topic: sensors/{device}/{metric}\n"
        f"store: {{path: {tmp_path / 'store.db'}, key: {{file: {keyfile}}}}}\n" + NO_SYNC + broker
    )
    refused(
        path,
        f"{path}:{at(path, str(pw))}: broker.password: cannot read secret file {pw}: "
        "No such file or directory",
    )
    pw.write_text("hunter2\n")
    refused(
        path,
        f"{path}:{at(path, str(tmp_path / 'ca.pem'))}: broker.tls.ca_file: cannot read "
        f"broker.tls.ca_file {tmp_path / 'ca.pem'}: No such file or directory",
    )
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    r = edgepipe("validate", "-c", str(path))
    assert r.returncode == 0, r.stderr
    assert "hunter2" not in r.stdout + r.stderr
