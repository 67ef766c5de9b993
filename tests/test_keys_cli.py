"""Keys from files, env vars and Kubernetes Secret mounts; ``edgepipe keys``, ``export`` and
``status`` on a real store; no key material in any output."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import re
from pathlib import Path

import pytest
import yaml

from config._models import Secret
from core._errors import KeyError_
from core._model import Batch, DeadLetter
from pipeline.cli import main
from storage import Keyring, Store

DEVICE = "keys-dev"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def materials(path: Path) -> list[str]:
    return [line.split()[1] for line in path.read_text().splitlines() if line.strip()]


def test_generate_mode_and_refuses_overwrite(tmp_path, capsys) -> None:
    f = tmp_path / "k.key"
    code, out, err = cli(capsys, "keys", "generate", "-o", str(f), "--id", "first")
    assert code == 0 and out == ""
    assert (f.stat().st_mode & 0o777) == 0o600
    assert Keyring.from_file(f).ids == ["first"]
    before = f.read_text()
    code, out, err = cli(capsys, "keys", "generate", "-o", str(f))
    assert code == 1 and "refusing to overwrite" in err
    assert f.read_text() == before
    assert materials(f)[0] not in out + err
    code, out, _ = cli(capsys, "keys", "generate")  # stdout on request
    assert code == 0 and Keyring.parse(out, "stdout").ids


def test_permissive_key_file_is_refused(tmp_path, capsys) -> None:
    f = tmp_path / "k.key"
    cli(capsys, "keys", "generate", "-o", str(f))
    f.chmod(0o640)
    with pytest.raises(KeyError_, match="chmod 600"):
        Keyring.from_file(f)
    code, out, err = cli(capsys, "keys", "rotate", str(f))
    assert code == 1 and "readable by group or others" in err
    assert len(materials(f)) == 1 and materials(f)[0] not in err


def test_kubernetes_secret_mount_and_env(tmp_path, monkeypatch) -> None:
    """The kubelet's layout: keyring -> ..data/keyring, ..data -> ..<timestamp>/."""
    from storage import generate_key_line

    mount = tmp_path / "secret"
    mount.mkdir()

    def publish_version(name: str, text: str, mode: int) -> None:
        d = mount / name
        d.mkdir()
        (d / "keyring").write_text(text)
        (d / "keyring").chmod(mode)
        tmp = mount / "..data_tmp"
        tmp.symlink_to(name)
        os.replace(tmp, mount / "..data")  # the kubelet's atomic swap

    line1 = generate_key_line("a")
    publish_version("..2026_01_01_00_00_00.1", line1 + "\n", 0o644)
    (mount / "keyring").symlink_to("..data/keyring")
    with pytest.raises(KeyError_, match="defaultMode: 0400") as e:
        Keyring.from_file(mount / "keyring")
    assert line1.split()[1] not in str(e.value)
    # defaultMode 0400 with fsGroup: 0440, readable by the pod's group only -- accepted
    publish_version("..2026_01_02_00_00_00.2", line1 + "\n" + generate_key_line("b"), 0o440)
    ring = Keyring.from_secret(Secret(file=mount / "keyring"))
    assert ring.ids == ["a", "b"] and ring.active_id == "b"
    # ... but not for a plain file
    plain = tmp_path / "plain.key"
    plain.write_text(line1 + "\n")
    plain.chmod(0o440)
    with pytest.raises(KeyError_, match="chmod 600"):
        Keyring.from_file(plain)
    assert line1.split()[1] not in repr(ring)

    monkeypatch.setenv("EDGEPIPE_STORE_KEY", line1)
    assert Keyring.from_secret(Secret(env="EDGEPIPE_STORE_KEY")).ids == ["a"]
    monkeypatch.delenv("EDGEPIPE_STORE_KEY")
    with pytest.raises(KeyError_, match="EDGEPIPE_STORE_KEY .* is not set"):
        Keyring.from_secret(Secret(env="EDGEPIPE_STORE_KEY"))
    with pytest.raises(KeyError_, match="line 1: a key must be 32 bytes"):
        Keyring.parse("x " + "QUJD" * 4, "test")


@pytest.fixture
def setup(tmp_path: Path, capsys) -> tuple[Path, Path]:
    keyfile = tmp_path / "store.key"
    assert cli(capsys, "keys", "generate", "-o", str(keyfile), "--id", "k1")[0] == 0
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "device": {"id": DEVICE},
                "subscriptions": [{"topic": "sensors/{device}/{metric}"}],
                "store": {"path": "store.db", "key": {"file": str(keyfile)}},
                "sync": {"enabled": False},
                "metrics": {"listen": None},
            }
        )
    )

    async def fill() -> None:
        kr = Keyring.from_file(keyfile)
        async with await Store.open(tmp_path / "store.db", kr, device_id=DEVICE) as s:
            for i in range(40):
                b = Batch()
                sid = s.registry.intern(f"dev{i % 4}", "temp" if i % 2 else "hum", {"f": "1"})
                for j in range(25):
                    b.append(1_700_000_000_000 + i * 60_000 + j, i + j / 4, sid)
                dead = [DeadLetter(5, "t", "bad", b"x")] if i == 0 else []
                await s.commit(b, dead, states={"st": b"s"})
            await s.mark_synced(range(1, 11))

    asyncio.run(fill())
    return cfg, keyfile


def test_status_text_and_json(setup, capsys) -> None:
    cfg, keyfile = setup
    code, out, err = cli(capsys, "status", "-c", str(cfg), "--json", "--verify")
    assert code == 0, err
    rep = json.loads(out)
    st = rep["store"]
    assert st["batches"] == 40 and st["readings"] == 1000
    assert st["unsynced_batches"] == 30 and st["sync_cursor"] == 10
    assert st["oldest_unsynced_ms"] == 1_700_000_000_000 + 10 * 60_000
    assert st["disk_bytes"] > 0 and st["verified_rows"] > 40
    assert rep["keys"]["active_key_id"] == "k1"
    code, out, _ = cli(capsys, "status", "-c", str(cfg))
    assert code == 0 and re.search(r"unsynced batches +30\n", out) and "active key id" in out
    assert materials(keyfile)[0] not in out


def test_status_before_the_first_run(tmp_path, capsys) -> None:
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        "subscriptions: [{topic: 'a/{device}/{metric}'}]\n"
        f"store: {{path: none-yet.db, key: {{file: {tmp_path / 'k'}}}}}\nsync: {{enabled: false}}\n"
    )
    code, out, err = cli(capsys, "status", "-c", str(cfg), "--json")
    assert code == 0, err
    assert json.loads(out)["store"]["exists"] is False
    assert not (tmp_path / "none-yet.db").exists()


def test_status_section_providers(setup, capsys) -> None:
    from pipeline.cli import _status

    async def extra(ctx):
        return {"last_upload_ms": None, "backlog": (await ctx.store.stats())["unsynced_batches"]}

    _status.add_section("sync", extra)
    try:
        code, out, _ = cli(capsys, "status", "-c", str(setup[0]), "--json")
        assert json.loads(out)["sync"] == {"last_upload_ms": None, "backlog": 30}
    finally:
        _status.SECTIONS[:] = [s for s in _status.SECTIONS if s[0] != "sync"]


def test_export_jsonl_and_csv(setup, tmp_path, capsys) -> None:
    cfg, _ = setup
    since = str(1_700_000_000 + 10 * 60)  # Unix seconds
    until = "2023-11-14T22:43:20Z"  # = 1_700_000_000 + 30 * 60
    code, out, err = cli(
        capsys, "export", "-c", str(cfg), "--since", since, "--until", until, "--device", "dev1"
    )
    assert code == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    # batches 10..29 in range; dev1 is i % 4 == 1: 11, 15, ..., 29 -> 5 batches of 25
    assert len(rows) == 125
    assert {r["device"] for r in rows} == {"dev1"} and rows[0]["tags"] == {"f": "1"}
    assert all(1_700_000_600_000 <= r["ts"] < 1_700_001_800_000 for r in rows)
    out_file = tmp_path / "x.csv"
    code, out, err = cli(
        capsys, "export", "-c", str(cfg), "--metric", "hum", "--format", "csv", "-o",
        str(out_file), "--progress",
    )  # fmt: skip
    assert code == 0 and "exported 500 reading(s)" in err and "exporting [" in err
    got = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert len(got) == 500 and {r["metric"] for r in got} == {"hum"}
    code, out, err = cli(capsys, "export", "-c", str(cfg), "--since", "yesterday-ish")
    assert code == 2 and "cannot read time" in err


def test_rotate_reencrypt_and_no_key_material_anywhere(setup, capsys, caplog) -> None:
    cfg, keyfile = setup
    caplog.set_level(logging.DEBUG)
    outputs = []
    code, out, err = cli(capsys, "keys", "rotate", str(keyfile), "--id", "k2")
    outputs += [out, err]
    assert code == 0 and (keyfile.stat().st_mode & 0o777) == 0o600
    assert Keyring.from_file(keyfile).ids == ["k1", "k2"]
    code, out, err = cli(capsys, "status", "-c", str(cfg), "--json")
    outputs += [out, err]
    assert json.loads(out)["keys"]["rows_by_key"]["k1"] > 0  # old rows stay readable
    code, out, err = cli(capsys, "keys", "reencrypt", "-c", str(cfg), "--chunk", "7")
    outputs += [out, err]
    assert code == 0 and "all" in err and "'k2'" in err
    code, out, err = cli(capsys, "keys", "list", str(keyfile))
    outputs += [out, err]
    assert out.split() == ["k1", "k2", "(active)"]
    # a wrong key: clear error, exit 1, nothing printed of either key
    good = keyfile.read_text()
    wrong = good.splitlines()[0] + "\n" + "k2 " + "A" * 43 + "\n"
    keyfile.write_text(wrong)
    code, out, err = cli(capsys, "status", "-c", str(cfg))
    outputs += [out, err]
    assert code == 1 and "is not the key this store was written with" in err
    keyfile.write_text(good)
    code, out, err = cli(capsys, "export", "-c", str(cfg))
    outputs += [out, err]
    assert code == 0 and len(out.splitlines()) == 1000
    everything = "\n".join(outputs) + caplog.text
    for m in materials(keyfile) + ["A" * 43]:
        assert m not in everything
