"""Every payload format through a real broker and edgepipe process into the store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgpack

from storage import Keyring, Store
from tests.helpers.edge import wait_for
from tests.helpers.mqtt import config, publish_now, started


async def _readings(db: Path, keyfile: Path) -> set[tuple[str, str, int, float]]:
    store = await Store.open(db, Keyring.from_file(keyfile), device_id="test-device")
    try:
        return {
            (r.device, r.metric, r.ts, r.value)
            for sb in await store.batches()
            for r in sb.batch.readings(store.registry)
        }
    finally:
        await store.close()


def test_all_formats_through_the_broker(tmp_path, broker, keyfile, edge):
    ts = 1_700_000_000
    cfg = config(
        tmp_path,
        broker,
        keyfile,
        broker={"client_id": "edgepipe-formats", "protocol": "5"},
        subscriptions=[
            {"topic": "num/{device}/{metric}", "format": "number", "timestamp": "arrival"},
            {"topic": "js/{device}/{metric}", "format": "json"},
            {"topic": "mp/{device}", "format": "msgpack"},
            {"topic": "senml/x", "format": "senml"},
            {"topic": "auto/{device}/{metric}"},
        ],
    )
    proc = started(edge, cfg)
    publish_now(
        broker,
        [
            ("num/d1/temp", b"21.5"),
            ("js/d2/rh", json.dumps({"ts": ts, "value": 40}).encode()),
            ("js/d2/multi", json.dumps({"ts": ts * 1000 + 1, "co": 1.5, "no2": 7}).encode()),
            ("mp/d3", msgpack.packb({"ts": "2023-11-14T22:13:20Z", "pm25": 12.0})),
            ("senml/x", json.dumps([{"bn": "d4:", "bt": ts}, {"n": "lux", "v": 300}]).encode()),
            ("auto/d5/volts", b"3.3"),
            ("auto/d5/amps", msgpack.packb({"ts": ts, "value": 0.5})),
        ],
    )
    db = tmp_path / "store.db"
    wait_for(lambda: db.exists() and len(asyncio.run(_readings(db, keyfile))) >= 8, 20, "stored")
    assert proc.terminate() == 0
    got = asyncio.run(_readings(db, keyfile))
    ms = ts * 1000
    arrival = {r for r in got if r[0] in ("d1", "d5") and r[1] in ("temp", "volts")}
    assert {(d, m, v) for d, m, _, v in arrival} == {("d1", "temp", 21.5), ("d5", "volts", 3.3)}
    assert got - arrival == {
        ("d2", "rh", ms, 40.0),
        ("d2", "co", ms + 1, 1.5),
        ("d2", "no2", ms + 1, 7.0),
        ("d3", "pm25", ms, 12.0),
        ("d4", "lux", ms, 300.0),
        ("d5", "amps", ms, 0.5),
    }
