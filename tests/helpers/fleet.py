"""A fleet under test: a real receiver (``edgepipe-cloud serve``) with a signing key, bundles
made and desired through the real CLI, a device's bundle state and events read from the
receiver's database, filters files with modules of our own, and an edge ``pipeline.yaml``
that trusts the fleet's key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from cloud import open_backend
from devtools._mosquitto import Mosquitto
from tests.helpers.cloud_cli import cli
from tests.helpers.edge import REPO, free_port
from tests.helpers.sync_env import Receiver

LIB = REPO / "filters" / "lib"


def unique_module(name: str, tag: str) -> bytes:
    """A library module with a custom section ``tag`` appended: still the same filter,
    another sha256 (so a test gets a module no device has cached yet)."""
    data = (LIB / f"{name}.wasm").read_bytes()
    label, payload = b"edgepipe-test", tag.encode()
    body = bytes([len(label)]) + label + payload
    assert len(body) < 128
    return data + b"\x00" + bytes([len(body)]) + body


def write_filters(directory: Path, stages: list[dict[str, Any]], tag: str = "") -> Path:
    """``directory/filters.yaml`` with ``stages`` (``module`` names a library filter, copied
    to ``lib/`` with ``tag`` making it unique); -> its path."""
    lib = directory / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    out = []
    for st in stages:
        st = dict(st)
        name = st.pop("module")
        path = lib / f"{name}{'-' + tag if tag else ''}.wasm"
        path.write_bytes(unique_module(name, tag) if tag else (LIB / f"{name}.wasm").read_bytes())
        out.append({"name": st.pop("name", name), "module": f"lib/{path.name}", **st})
    f = directory / "filters.yaml"
    f.write_text(
        f"# written for a test ({tag or 'plain'})\n"
        + yaml.safe_dump({"version": 1, "chain": out}, sort_keys=False)
    )
    return f


def validity(lo: float, hi: float, **kw: Any) -> dict[str, Any]:
    return {
        "name": "validity",
        "module": "validity",
        "kind": "filter",
        "config": {"min": lo, "max": hi},
        **kw,
    }


class Fleet:
    """The receiver, its database, its signing key file and the CLI around them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.receiver = Receiver(tmp)
        self.signing_key = tmp / "fleet-signing.key"
        r = cli("signing-key", "generate", "--out", str(self.signing_key))
        assert r.returncode == 0, r.stderr
        self.public_key = r.stdout.strip()
        self.secrets: dict[str, str] = {}

    @property
    def db(self) -> str:
        return self.receiver.db

    def add_device(self, name: str) -> str:
        self.secrets[name] = self.receiver.add_device(name)
        return self.secrets[name]

    def cli(self, *args: str, key: Path | None = None) -> Any:
        return cli(
            *args,
            "--db",
            self.db,
            "--master-key-file",
            str(self.receiver.master_key_file),
            env={"EDGEPIPE_CLOUD_SIGNING_KEY_FILE": str(key or self.signing_key)},
        )

    def bundle(self, filters: Path, *args: str, key: Path | None = None) -> int:
        r = self.cli("bundle", "create", str(filters), *args, key=key)
        assert r.returncode == 0, r.stderr
        return int(json.loads(r.stdout)["version"])

    def desire(self, device: str, version: int) -> None:
        r = self.cli("devices", "desire", device, str(version))
        assert r.returncode == 0, r.stderr

    @contextmanager
    def backend(self) -> Iterator[Any]:
        with open_backend(self.db, create=False) as b:
            yield b

    def state(self, device: str) -> dict[str, Any]:
        with self.backend() as b:
            return b.bundle_state(device)

    def events(self, device: str) -> list[dict[str, Any]]:
        with self.backend() as b:
            return b.bundle_events(device)

    def sql(self, statement: str, *args: Any) -> None:
        import sqlite3

        con = sqlite3.connect(self.receiver.db_path, timeout=10)
        try:
            con.execute(statement, args)
            con.commit()
        finally:
            con.close()

    def tamper_module(self, version: int, change: Any) -> None:
        """Replace the stored bytes of every module of bundle ``version`` by ``change(data)``
        (what a compromised store or a man in the middle would serve)."""
        import sqlite3

        con = sqlite3.connect(self.receiver.db_path, timeout=10)
        try:
            rows = con.execute(
                "SELECT sha256, data FROM bundle_modules WHERE sha256 IN "
                "(SELECT sha256 FROM bundle_files WHERE version = ?)",
                (version,),
            ).fetchall()
            for sha, data in rows:
                new = change(bytes(data))
                con.execute(
                    "UPDATE bundle_modules SET data = ?, size = ? WHERE sha256 = ?",
                    (new, len(new), sha),
                )
            con.commit()
        finally:
            con.close()

    def new_key(self, name: str) -> tuple[Path, str]:
        """Another signing key file; -> (path, public key line)."""
        path = self.tmp / name
        r = cli("signing-key", "generate", "--out", str(path))
        assert r.returncode == 0, r.stderr
        return path, r.stdout.strip()


def edge_config(
    tmp: Path,
    broker: Mosquitto,
    keyfile: Path,
    fleet: Fleet,
    device: str,
    chain: Path,
    *,
    trusted: list[str] | None = None,
    retired: list[str] | None = None,
    links: dict[str, Any] | None = None,
    **bundles: Any,
) -> Path:
    """A pipeline.yaml for ``edgepipe run`` as ``device`` of ``fleet``: its local chain file
    ``chain``, syncing to the receiver, checking for bundles every second."""
    (tmp / "device.secret").write_text(fleet.secrets[device] + "\n")
    (tmp / "device.secret").chmod(0o600)
    sync: dict[str, Any] = {
        "url": fleet.receiver.url,
        "device_secret": {"file": str(tmp / "device.secret")},
        "interval_s": 0.2,
        "backoff_min_s": 0.2,
        "backoff_max_s": 1.0,
        "timeout_s": 10.0,
        "bundles": {
            "trusted_keys": trusted if trusted is not None else [fleet.public_key],
            "retired_keys": retired or [],
            "check_every_s": 1,
            **bundles,
        },
    }
    if links is not None:
        sync["links"] = links
    cfg = {
        "device": {"id": device},
        "broker": {"host": broker.host, "port": broker.port, "client_id": f"edgepipe-{device}"},
        "subscriptions": [{"topic": "sensors/{device}/{metric}", "qos": 1}],
        "batch": {"max_messages": 100, "max_delay_ms": 10},
        "chain_file": str(chain),
        "store": {"path": str(tmp / "store.db"), "key": {"file": str(keyfile)}},
        "sync": sync,
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
