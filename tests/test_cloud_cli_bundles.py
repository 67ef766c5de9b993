"""``edgepipe-cloud signing-key``, ``bundle`` and ``devices desire|bundles`` as an operator
runs them: separate processes on a real SQLite database, key files checked on disk."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from protocol import _bundle
from tests.helpers.cloud_cli import cli, key_file
from tests.helpers.fleet import validity, write_filters


def _env(tmp: Path, signing: Path) -> dict[str, str]:
    return {
        "EDGEPIPE_CLOUD_DB": f"sqlite:///{tmp / 'c.db'}",
        "EDGEPIPE_CLOUD_MASTER_KEY_FILE": str(tmp / "master.key"),
        "EDGEPIPE_CLOUD_SIGNING_KEY_FILE": str(signing),
    }


def test_signing_keys_bundles_and_desire(tmp_path: Path) -> None:
    key_file(tmp_path)
    signing = tmp_path / "signing.key"
    env = _env(tmp_path, signing)
    # without a signing key: a usage error naming how to make one
    r = cli("signing-key", "list", env={**env, "EDGEPIPE_CLOUD_SIGNING_KEY_FILE": ""})
    assert r.returncode == 2 and "signing-key generate" in r.stderr
    r = cli("signing-key", "list", env=env)
    assert r.returncode == 2 and "No such file" in r.stderr
    r = cli("signing-key", "generate", "--out", str(signing), env=env)
    assert r.returncode == 0 and stat.S_IMODE(signing.stat().st_mode) == 0o600
    first = _bundle.PublicKey.parse(r.stdout.strip())
    assert r.stdout.strip() not in signing.read_text()  # the file holds the private key
    assert cli("signing-key", "generate", "--out", str(signing), env=env).returncode == 1
    signing.chmod(0o644)
    r = cli("signing-key", "list", env=env)
    assert r.returncode == 2 and "chmod 600" in r.stderr
    signing.chmod(0o600)
    assert cli("init", env=env).returncode == 0
    assert cli("devices", "add", "gw-1", env=env).returncode == 0

    filters = write_filters(tmp_path / "f", [validity(0, 100)])
    r = cli("bundle", "create", str(filters), env=env)
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["version"] == 1 and made["key_id"] == first.id and made["priority"] == "normal"
    r = cli("bundle", "create", str(filters), "--priority", "urgent", env=env)
    assert json.loads(r.stdout)["version"] == 2
    # rotate: the new key signs from now on, the old one stays listed
    r = cli("signing-key", "rotate", env=env)
    assert r.returncode == 0 and "trusted_keys" in r.stderr
    second = _bundle.PublicKey.parse(r.stdout.strip())
    listed = [json.loads(line) for line in cli("signing-key", "list", env=env).stdout.splitlines()]
    assert [(k["key_id"], k["status"]) for k in listed] == [
        (first.id, "previous"),
        (second.id, "active"),
    ]
    assert json.loads(cli("bundle", "create", str(filters), env=env).stdout)["key_id"] == second.id
    r = cli("bundle", "create", str(filters), "--key", first.id, env=env)
    assert json.loads(r.stdout)["key_id"] == first.id
    assert cli("bundle", "create", str(filters), "--key", "ed" + "0" * 16, env=env).returncode == 2
    r = cli("bundle", "create", "--from", "1", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["from_version"] == 1
    assert cli("bundle", "create", env=env).returncode == 2
    assert cli("bundle", "create", str(filters), "--from", "1", env=env).returncode == 2
    versions = [
        json.loads(x)["version"] for x in cli("bundle", "list", env=env).stdout.splitlines()
    ]
    assert versions == [5, 4, 3, 2, 1]
    # a filters file that cannot be a bundle: exit 1, located, nothing stored
    bad = tmp_path / "f" / "bad.yaml"
    bad.write_text("version: 1\nchain:\n  - name: a\n    module: ../../x.wasm\n")
    r = cli("bundle", "create", str(bad), env=env)
    assert r.returncode == 1 and "bad.yaml" in r.stderr and "'..'" in r.stderr
    assert len(cli("bundle", "list", env=env).stdout.splitlines()) == 5
    # a local bundle: no filters file, no --from; signed like the others
    assert cli("bundle", "create", str(filters), "--local", env=env).returncode == 2
    assert cli("bundle", "create", "--from", "1", "--local", env=env).returncode == 2
    assert len(cli("bundle", "list", env=env).stdout.splitlines()) == 5
    r = cli("bundle", "create", "--local", "--priority", "urgent", env=env)
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["version"] == 6 and made["chain"] == "local" and made["modules"] == 0
    assert made["key_id"] == second.id and made["priority"] == "urgent"
    listed = json.loads(cli("bundle", "list", env=env).stdout.splitlines()[0])
    assert listed["version"] == 6 and listed["filters_sha256"] == "local"
    r = cli("bundle", "create", "--from", "6", env=env)  # a local bundle re-issued stays local
    assert r.returncode == 0 and json.loads(r.stdout)["chain"] == "local"
    # desire
    assert cli("devices", "desire", "gw-1", "2", "--reason", "canary", env=env).returncode == 0
    r = cli("devices", "desire", "gw-1", "99", env=env)
    assert r.returncode == 1 and "no bundle version 99" in r.stderr
    assert cli("devices", "desire", "nobody", "2", env=env).returncode == 1
    assert cli("devices", "desire", "gw-1", "two", env=env).returncode == 2
    state = json.loads(cli("devices", "bundles", env=env).stdout)
    assert state["device"] == "gw-1" and state["desired_version"] == 2
    assert state["desired_reason"] == "canary" and not state["in_sync"]
    assert cli("devices", "desire", "gw-1", "none", env=env).returncode == 0
    assert json.loads(cli("devices", "bundles", env=env).stdout)["desired_version"] is None
    # a key from the environment cannot be rotated by edgepipe-cloud
    env2 = {
        **env,
        "EDGEPIPE_CLOUD_SIGNING_KEY_FILE": "",
        "EDGEPIPE_CLOUD_SIGNING_KEY": signing.read_text(),
    }
    r = cli("signing-key", "rotate", env=env2)
    assert r.returncode == 2 and "cannot change" in r.stderr
    assert len(cli("signing-key", "list", env=env2).stdout.splitlines()) == 2
