"""Key rotation under a running edgepipe: rotate the keyring, restart, and the pipeline
re-encrypts the old rows in the background while it keeps storing new readings."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pipeline.cli import main
from storage import Keyring, Store
from tests.helpers.edge import make_config, publish, reading_msg, wait_for


def _by_key(db: Path, keyfile: Path) -> dict[str, int]:
    async def go() -> dict[str, int]:
        async with await Store.open(db, Keyring.from_file(keyfile), device_id="test-device") as s:
            return await s.rows_by_key()

    return asyncio.run(go())


def _values(db: Path, keyfile: Path) -> list[float]:
    async def go() -> list[float]:
        async with await Store.open(db, Keyring.from_file(keyfile), device_id="test-device") as s:
            await s.verify()
            return sorted([r.value async for r in s.query()])

    return asyncio.run(go())


def test_rotation_and_background_reencryption(tmp_path, broker, keyfile, edge) -> None:
    db = tmp_path / "store.db"
    cfg = make_config(tmp_path, broker, keyfile, batch={"max_messages": 20, "max_delay_ms": 5})
    old_id = Keyring.from_file(keyfile).active_id
    proc = edge(cfg)
    proc.wait_subscribed()
    publish(broker, [reading_msg(f"d{i % 3}", "t", i, float(i)) for i in range(400)])
    wait_for(lambda: db.exists() and len(_values(db, keyfile)) == 400, 30, "first readings")
    assert proc.terminate() == 0

    assert main(["keys", "rotate", str(keyfile), "--id", "fresh"]) == 0
    assert Keyring.from_file(keyfile).ids == [old_id, "fresh"]
    assert set(_by_key(db, keyfile)) == {old_id}

    proc = edge(cfg)
    proc.wait_subscribed()
    publish(broker, [reading_msg(f"d{i % 3}", "t", i, float(i)) for i in range(400, 500)])
    wait_for(lambda: set(_by_key(db, keyfile)) == {"fresh"}, 60, "background re-encryption")
    wait_for(lambda: len(_values(db, keyfile)) == 500, 30, "new readings")
    proc.wait_metric("edgepipe_messages_acked_total", 100, 30)
    assert proc.terminate() == 0

    # the old key can be dropped: everything reads with the new one alone
    keyfile.write_text(keyfile.read_text().splitlines()[-1] + "\n")
    assert _values(db, keyfile) == [float(i) for i in range(500)]
