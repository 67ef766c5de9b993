"""Device health and logs: sampled on the edge, kept in the sealed store, uploaded with the
batches to a real receiver (``edgepipe-cloud serve``), refused there when malformed."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import pytest

from core._clock import ManualClock
from core._errors import SyncError
from storage import _logring
from sync._health import HealthSampler, decode_delta, encode_health, proc_fields
from sync._logs import LogCollector, redacted_message
from sync._request import encode_request
from tests.helpers.sync_env import BASE_TS, fill, make_worker, open_store, sync_cfg


def _rows(db: Path, sql: str, *args: Any) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _worker(store: Any, receiver: Any, clock: ManualClock) -> Any:
    w = make_worker(store, sync_cfg(receiver.url, receiver.secret), "edge-1", clock=clock)
    w.health = HealthSampler(store_path=store.path, extra=[lambda: {"chain": "abc123"}])
    w.logs = LogCollector(clock=clock.time)
    return w


def test_snapshot_reads_proc_and_sys(tmp_path: Path) -> None:
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "status").write_text("Name:\tedgepipe\nVmRSS:\t   41234 kB\n")
    (proc / "loadavg").write_text("0.42 0.30 0.20 1/99 1234\n")
    (proc / "meminfo").write_text(
        "MemTotal: 512000 kB\nMemFree: 1000 kB\nMemAvailable: 200000 kB\n"
    )
    for i, t in enumerate((48123, 51000)):
        z = sys / "class" / "thermal" / f"thermal_zone{i}"
        z.mkdir(parents=True)
        (z / "temp").write_text(f"{t}\n")
    f = proc_fields(proc, sys)
    assert f["rss_kb"] == 41234
    assert f["load1_x100"] == 42
    assert f["mem_total_kb"] == 512000 and f["mem_avail_kb"] == 200000
    assert f["temp_mc"] == 51000  # the hottest zone
    assert f["cpu_ms"] >= 0
    # the real /proc of this machine has the process fields too
    real = proc_fields()
    assert real["rss_kb"] > 1000 and "mem_avail_kb" in real


def test_delta_encoding_round_trips() -> None:
    recs = [
        (1, {"ts": BASE_TS, "rss_kb": 40000, "chain": "aa"}),
        (2, {"ts": BASE_TS + 60_000, "rss_kb": 40100, "chain": "aa", "traps:s:oob": 1}),
        (3, {"ts": BASE_TS + 120_000, "rss_kb": 39900, "chain": "bb"}),
    ]
    block = msgpack.unpackb(encode_health(recs))
    cols = dict(zip(block["keys"], block["cols"], strict=True))
    assert decode_delta(block["seq"]) == [1, 2, 3]
    assert cols["ts"] == [BASE_TS, 60_000, 60_000]
    assert decode_delta(cols["rss_kb"]) == [40000, 40100, 39900]
    assert decode_delta(cols["traps:s:oob"]) == [None, 1, None]
    assert cols["chain"] == ["aa", None, "bb"]  # text: only where it changes


def test_log_collector_dedups_redacts_and_bounds() -> None:
    c = LogCollector(per_minute=5)
    lg = logging.getLogger("edgepipe.test-health")
    lg.addHandler(c)
    lg.propagate = False
    try:
        for i in range(10_000):
            lg.warning("stage %s failed (%s): value %s", "validity", "oob", 21.5 + i)
        lg.error("tags were %s", {"site": "secret-site"})
        lg.warning("x" * 5000)
        for i in range(20):  # distinct templates beyond the rate limit
            lg.warning(f"distinct {i}")
    finally:
        lg.removeHandler(c)
        lg.propagate = True
    recs = c.drain()
    first = recs[0]
    assert first["n"] == 10_000 and first["level"] == "WARNING"
    assert first["msg"] == "stage validity failed (oob): value <redacted>"
    assert "secret-site" not in json.dumps(recs)
    assert max(len(r["msg"]) for r in recs) <= 512
    suppressed = [r for r in recs if r["logger"] == "edgepipe.logs"]
    assert len(suppressed) == 1 and suppressed[0]["n"] == 18  # 2 of the 20 fit the limit
    assert len(recs) == 5 + 1
    assert c.drain() == []
    # a number redacted is text, whatever conversion the template gave it
    r = logging.LogRecord(
        "x", logging.WARNING, "", 1, "port %d, in %.2fs, %d%%", (1883, 0.5, 3), None
    )
    assert redacted_message(r) == "port <redacted>, in <redacted>s, <redacted>%"


def test_ring_is_bounded_and_sealed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_logring.RING_ROWS, "logs", 10)

    async def go() -> None:
        store = await open_store(tmp_path)
        try:
            for i in range(25):
                rec = {"ts": BASE_TS + i, "last": BASE_TS + i, "level": "WARNING"}
                rec |= {"logger": "edgepipe", "msg": f"secret-text-{i}", "n": 1}
                await store.append_records("logs", [rec])
            got = await store.unsynced_records("logs", 100)
            assert [r["msg"] for _, r in got] == [f"secret-text-{i}" for i in range(15, 25)]
            await store.mark_records_synced("logs", [got[0][0]])
            assert len(await store.unsynced_records("logs", 100)) == 9
            assert (await store.verify())["logs"] == 10
        finally:
            await store.close()

    asyncio.run(go())
    raw = (tmp_path / "store.db").read_bytes()
    assert b"secret-text" not in raw


def test_store_schema_2_migrates_forward(tmp_path: Path) -> None:
    async def make() -> None:
        store = await open_store(tmp_path)
        await fill(store, 2, 5)
        await store.close()

    asyncio.run(make())
    con = sqlite3.connect(tmp_path / "store.db")
    con.execute("DROP TABLE health")  # what a schema-2 file is: no device-record tables
    con.execute("DROP TABLE logs")
    con.execute("PRAGMA user_version=2")
    con.commit()
    con.close()

    async def reopen() -> None:
        store = await open_store(tmp_path)
        try:
            assert store.schema_version == 3
            await store.append_records("health", [{"ts": BASE_TS, "rss_kb": 1}])
            assert len(await store.unsynced(limit=10)) == 2  # the readings are all there
            counts = await store.verify()
            assert counts["health"] == 1 and counts["batches"] == 2
        finally:
            await store.close()

    asyncio.run(reopen())
    assert _rows(tmp_path / "store.db", "PRAGMA user_version") == [(3,)]


def test_health_and_logs_reach_the_receiver(tmp_path: Path, receiver: Any) -> None:
    import time

    clock = ManualClock(time.time())  # the receiver checks timestamps against its clock

    async def go() -> None:
        store = await open_store(tmp_path)
        try:
            await fill(store, 1, 10)
            w = _worker(store, receiver, clock)
            lg = logging.getLogger("edgepipe.chain")
            lg.addHandler(w.logs)
            try:
                for _ in range(10_000):
                    lg.warning("stage %s failed (%s): %s", "validity", "oob", 3.25)
            finally:
                lg.removeHandler(w.logs)
            await w.record_now()
            assert await w.sync_once() == 10
            assert w.clock_skew_ms is not None and abs(w.clock_skew_ms) < 60_000
            assert await store.unsynced_records("health") == []
            assert await store.unsynced_records("logs") == []
            w.close()
        finally:
            await store.close()

    asyncio.run(go())
    db = receiver.db_path
    logs = _rows(db, "SELECT level, logger, msg, n FROM device_logs")
    assert logs == [
        ("WARNING", "edgepipe.chain", "stage validity failed (oob): <redacted>", 10_000)
    ]
    (data,) = _rows(db, "SELECT data FROM device_health")[0]
    values = json.loads(data)
    assert values["chain"] == "abc123"
    assert values["rss_kb"] > 1000 and values["store_quota_b"] > 0
    assert values["stored"] >= 10
    assert abs(values["receiver_skew_ms"]) < 60_000  # from the signed timestamp


def _post(receiver: Any, body: dict[str, Any]) -> SyncError:
    from sync._transport import Transport, secret_bytes

    raw = msgpack.packb(body, use_bin_type=True)
    t = Transport(
        receiver.url, device_id="edge-1", secret=secret_bytes(receiver.secret), timeout_s=10
    )
    try:
        with pytest.raises(SyncError) as e:
            t.post_batches(raw, "identity", "wifi")
    finally:
        t.close()
    return e.value


@pytest.mark.parametrize(
    ("health", "logs", "detail"),
    [
        ({"seq": [1], "keys": ["ts"], "cols": [[9_000_000_000_000]]}, None, "ahead of"),
        ({"seq": [1], "keys": ["rss_kb"], "cols": [[5]]}, None, "no 'ts' column"),
        ({"seq": [1], "keys": ["ts", "x"], "cols": [[BASE_TS], [[1]]]}, None, "expected an integer"),
        (
            {"seq": [1] * 300, "keys": ["ts"], "cols": [[BASE_TS] * 300]},
            None,
            "at most 240",
        ),
        (None, [{"seq": 1, "ts": BASE_TS, "level": "DEBUG", "logger": "a", "msg": "m", "n": 1}],
         "level"),
        (None, [{"seq": 1, "ts": BASE_TS, "level": "ERROR", "logger": "a", "msg": "m" * 9000,
                 "n": 1}], "at most"),
        (None, [{"seq": 1, "ts": BASE_TS, "level": "ERROR", "logger": "a", "msg": "m", "n": 1,
                 "device": "other"}], "unknown key 'device'"),
    ],
)  # fmt: skip
def test_bad_records_are_refused_and_nothing_is_stored(
    receiver: Any, health: Any, logs: Any, detail: str
) -> None:
    body: dict[str, Any] = {"v": 1, "device": "edge-1", "status": {}, "batches": []}
    if health is not None:
        body["health"] = msgpack.packb(health, use_bin_type=True)
    if logs is not None:
        body["logs"] = logs
    err = _post(receiver, body)
    assert err.status == 400 and "bad_body" in str(err) and detail in str(err)
    db = receiver.db_path
    assert _rows(db, "SELECT count(*) FROM device_health") == [(0,)]
    assert _rows(db, "SELECT count(*) FROM device_logs") == [(0,)]
    assert receiver.rejection_reasons()[-1] == "bad_body"


def test_wire_bytes_per_snapshot_and_log_record(tmp_path: Path) -> None:
    """What a snapshot and a log record add to a zstd body (the figures of docs/health.md
    are measured this way); bounded so a regression in the encoding shows."""
    sampler = HealthSampler(store_path=tmp_path / "s.db")
    stats = {"used_bytes": 1 << 20, "disk_bytes": 1 << 21, "quota_bytes": 1 << 30}
    snaps = [
        (i + 1, sampler.sample(BASE_TS + i * 60_000, stats, {"wifi": i * 1000})) for i in range(60)
    ]
    empty, _ = encode_request("edge-1", [], {}, "zstd")
    one, _ = encode_request("edge-1", [], {}, "zstd", None, {"health": encode_health(snaps[:1])})
    many, _ = encode_request("edge-1", [], {}, "zstd", None, {"health": encode_health(snaps)})
    per_snapshot = (len(many) - len(empty)) / 60
    assert len(one) - len(empty) < 1500
    assert per_snapshot < 200
    log = {"seq": 1, "ts": BASE_TS, "last": BASE_TS, "level": "WARNING", "logger": "edgepipe.chain",
           "msg": "stage validity failed (oob): wasm trap: out of bounds memory access", "n": 1}  # fmt: skip
    with_log, _ = encode_request("edge-1", [], {}, "zstd", None, {"logs": [log]})
    assert len(with_log) - len(empty) < 200


def test_receiver_queries_and_badges(tmp_path: Path, receiver: Any) -> None:
    """The read side: the log view's level, text and time filters, and the badges of a
    store filling towards its quota (each naming the snapshot that is its evidence)."""
    import time

    from cloud import open_backend
    from cloud._health_api import badges

    clock = ManualClock(time.time())

    async def go() -> None:
        store = await open_store(tmp_path)
        try:
            w = _worker(store, receiver, clock)
            quota = {"used_bytes": 0}
            w.health.extra.append(lambda: {"store_used_b": quota["used_bytes"]})
            lg = logging.getLogger("edgepipe.chain")
            lg.addHandler(w.logs)
            try:
                lg.warning("stage %s failed (%s): wasm trap", "scale", "unreachable")
                lg.error("store is not writable")
            finally:
                lg.removeHandler(w.logs)
            await w.record_now()
            quota["used_bytes"] = int(store.max_bytes * 0.9)
            clock.advance(1)  # a device clock far ahead would raise the skew badge too
            await w.record_now()
            await w.sync_once()
            w.close()
        finally:
            await store.close()

    asyncio.run(go())
    backend = open_backend(f"sqlite:///{receiver.db_path}", create=False)
    try:
        assert [r["level"] for r in backend.device_logs("edge-1", level="ERROR")] == ["ERROR"]
        hits = backend.device_logs("edge-1", text="UNREACHABLE")
        assert [r["msg"] for r in hits] == ["stage scale failed (unreachable): wasm trap"]
        assert backend.device_logs("edge-1", since=int(clock.time() * 1000) + 1) == []
        snaps = backend.device_health("edge-1")
        assert len(snaps) == 2
        now = int(clock.time() * 1000)
        first = badges(snaps[:1], None, now)
        assert [b["badge"] for b in first] == []
        got = badges(snaps, None, now)
        assert [b["badge"] for b in got] == ["store_full"]
        assert got[0]["seq"] == snaps[-1]["seq"] and got[0]["key"] == "store_used_b"
        silent = badges(snaps, None, now + 3_600_000)
        assert "silent" in [b["badge"] for b in silent]
        assert abs(snaps[-1]["values"]["receiver_skew_ms"]) < 30_000
        snaps[-1]["values"]["clock_skew_ms"] = -120_000  # the device's own estimate
        skewed = badges(snaps, None, now)
        assert "clock_skew" in [b["badge"] for b in skewed]
    finally:
        backend.close()


def test_receiver_schema_2_migrates_forward(tmp_path: Path) -> None:
    from cloud import open_backend
    from cloud._backend import SCHEMA_VERSION

    url = f"sqlite:///{tmp_path / 'cloud.db'}"
    open_backend(url).close()
    con = sqlite3.connect(tmp_path / "cloud.db")
    con.execute("DROP TABLE device_health")  # what a schema-2 database is
    con.execute("DROP TABLE device_logs")
    con.execute("UPDATE schema_version SET version = 2")
    con.commit()
    con.close()
    with open_backend(url) as b:
        assert b.device_health("nobody") == [] and b.device_logs("nobody") == []
    assert _rows(tmp_path / "cloud.db", "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
