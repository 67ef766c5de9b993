"""End to end on real components: mosquitto -> edgepipe -> encrypted SQLite (-> receiver)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import make_config, publish, reading_msg, wait_for

from storage import Keyring, Store


async def _stored(db: Path, keyfile: Path) -> list[tuple[str, str, int, float]]:
    store = await Store.open(db, Keyring.from_file(keyfile), device_id="test-device")
    try:
        out = []
        for sb in await store.batches():
            for r in sb.batch.readings(store.registry):
                out.append((r.device, r.metric, r.ts, r.value))
        return out
    finally:
        await store.close()


def stored(db: Path, keyfile: Path) -> list[tuple[str, str, int, float]]:
    return asyncio.run(_stored(db, keyfile))


def test_readings_flow_to_encrypted_store(tmp_path, broker, keyfile, edge):
    cfg = make_config(tmp_path, broker, keyfile)
    proc = edge(cfg)
    n = 500
    # the subscription must exist before publishing: wait for the status topic / log
    wait_for(lambda: "connected to" in proc.output(), 20, "edgepipe to connect")
    publish(broker, [reading_msg(f"dev{i % 5}", "temp", i, i * 0.5) for i in range(n)])
    db = tmp_path / "store.db"
    wait_for(lambda: db.exists() and len(stored(db, keyfile)) >= n, 30, "all readings stored")
    assert proc.terminate() == 0
    rows = stored(db, keyfile)
    assert len(rows) == n
    assert sorted(v for *_, v in rows) == [i * 0.5 for i in range(n)]
    assert {d for d, *_ in rows} == {f"dev{i}" for i in range(5)}
    # nothing readable on disk
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    assert b"dev1" not in raw and b"temp" not in raw
