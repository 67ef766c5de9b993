"""The backend methods the dashboard adds, on both backends (real SQLite file, real
PostgreSQL): operators, sessions, fleet activity, and the hourly rollup that long-range
downsampling reads (it must agree exactly with aggregating the raw rows)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import msgpack
import pytest

from cloud import Backend, OperatorExists, ReadingsQuery, open_backend
from cloud._backend import ROLLUP_MS
from cloud._wire import decode_upload
from tests.helpers.cloud_client import make_batch, new_device, new_master_key, open_test_backend

HOUR = ROLLUP_MS
T0 = 1_700_000_000_000 // HOUR * HOUR  # an hour boundary


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    with open_test_backend(request.param, tmp_path_factory.mktemp("dash")) as b:
        yield b


def _ingest(backend: Backend, device: str, seq: int, readings: list, now: int = T0) -> None:
    body = msgpack.packb(
        {
            "v": 1,
            "device": device,
            "status": {
                "backlog_batches": 0,
                "backlog_readings": 0,
                "oldest_unsynced_ms": None,
                "dead_letters": 0,
                "link": "wifi",
            },
            "batches": [make_batch(seq, readings)],
        },
        use_bin_type=True,
    )
    backend.ingest(
        decode_upload(body, device),
        link="wifi",
        nbytes=len(body),
        nonce=f"{seq:032x}",
        nonce_expires=now + 600_000,
        now=now,
    )


def test_operators(backend: Backend) -> None:
    backend.add_operator("op-a", "hash-1")
    with pytest.raises(OperatorExists):
        backend.add_operator("op-a", "hash-2")
    assert backend.operator_hash("op-a") == "hash-1"
    assert backend.operator_hash("nobody") is None
    assert backend.set_operator_hash("op-a", "hash-3") and backend.operator_hash("op-a") == "hash-3"
    assert not backend.set_operator_hash("nobody", "x")
    assert "op-a" in [o["name"] for o in backend.list_operators()]


def test_sessions_expire_and_end_with_their_operator(backend: Backend) -> None:
    backend.add_operator("op-s", "h")
    backend.create_session("key-1", "op-s", "csrf-1", now=1000, expires=5000)
    backend.create_session("key-2", "op-s", "csrf-2", now=1000, expires=9000)
    assert backend.get_session("key-1", 4999) == {
        "operator": "op-s",
        "csrf": "csrf-1",
        "expires_ms": 5000,
    }
    assert backend.get_session("key-1", 5000) is None  # expired
    assert backend.get_session("other", 1000) is None
    assert backend.delete_session("key-1") and not backend.delete_session("key-1")
    assert backend.get_session("key-2", 2000) is not None
    assert backend.remove_operator("op-s")
    assert backend.get_session("key-2", 2000) is None  # revoked with the operator
    assert not backend.remove_operator("op-s")


def test_device_activity(backend: Backend) -> None:
    name, _ = new_device(backend, "act")
    idle, _ = new_device(backend, "idle")
    _ingest(
        backend,
        name,
        1,
        [("s1", "temp", None, T0 + 5, 1.0, 0), ("s1", "hum", None, T0 + 9, 2.0, 0)],
    )
    backend.record_rejection(name, "bad_signature", "x", "127.0.0.1", T0 + 100)
    backend.record_rejection(name, "stale", "x", "127.0.0.1", T0 - 100)
    act = backend.device_activity(T0)
    assert act[name] == {"newest_ts": T0 + 9, "rejections": 1}
    assert act[idle] == {"newest_ts": None, "rejections": 0}


def test_rollup_agrees_with_raw_downsampling(backend: Backend) -> None:
    name, _ = new_device(backend, "roll")
    rnd = random.Random(7)
    readings = [
        ("s1", "temp", None, T0 + rnd.randrange(0, 30 * HOUR), rnd.uniform(-50, 50), 0)
        for _ in range(3000)
    ]
    for seq, i in enumerate(range(0, len(readings), 500), start=1):
        _ingest(backend, name, seq, readings[i : i + 500])
    since, until = T0, T0 + 30 * HOUR
    # Aligned whole hours: served from the rollup.
    rolled = backend.readings(ReadingsQuery(name, "temp", since=since, until=until, step=3 * HOUR))
    # Same buckets, shifted off the hour boundary by nothing but forced through the raw path.
    raw = backend.readings(ReadingsQuery(name, "temp", since=since, until=until + 1, step=3 * HOUR))
    assert len(rolled["rows"]) == 10
    assert sum(r["count"] for r in rolled["rows"]) == 3000
    for a, b in zip(rolled["rows"], raw["rows"], strict=True):
        assert (a["ts"], a["count"], a["min"], a["max"]) == (
            b["ts"],
            b["count"],
            b["min"],
            b["max"],
        )
        assert a["avg"] == pytest.approx(b["avg"], rel=1e-9, abs=1e-9)
    metrics = backend.device_metrics(name)
    assert [(m["metric"], m["count"]) for m in metrics] == [("temp", 3000)]
    assert metrics[0]["first_ts"] == min(r[3] for r in readings)
    # Removing the device removes its rollup too.
    assert backend.remove_device(name)


def test_rollup_is_built_for_an_existing_database(tmp_path) -> None:
    path = tmp_path / "old.db"
    with open_backend(f"sqlite:///{path}", master_key=new_master_key()) as b:
        name, _ = new_device(b, "old")
        _ingest(b, name, 1, [("s", "m", None, T0 + i * 60_000, float(i), 0) for i in range(120)])
        with b._write() as cur:  # as written by a receiver without the rollup
            cur.execute("DELETE FROM readings_hourly")
    with open_backend(f"sqlite:///{path}") as b:
        rows = b.readings(ReadingsQuery(name, "m", since=T0, until=T0 + 2 * HOUR, step=HOUR))[
            "rows"
        ]
        assert [(r["ts"], r["count"]) for r in rows] == [(T0, 60), (T0 + HOUR, 60)]
