"""The encrypted store on real SQLite files: round trips, queries, quota, sequence numbers."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from core._errors import StoreError, StoreFullError
from core._metrics import METRICS
from core._model import Batch, DeadLetter
from storage import Keyring, Store, generate_key_line

DEVICE = "dev-a"


def keyring(*ids: str) -> Keyring:
    return Keyring.parse("\n".join(generate_key_line(i) for i in ids or ("k1",)), "test")


def make_batch(store: Store, i: int, n: int = 50, device: str = "boiler-1") -> Batch:
    b = Batch()
    sid = store.registry.intern(device, "temp", {"room": "r1"})
    sid2 = store.registry.intern(device, "hum")
    for j in range(n):
        b.append(1_700_000_000_000 + i * 1000 + j, i + j / 100, sid if j % 2 else sid2)
    return b


def run(coro):
    return asyncio.run(coro)


def test_round_trip_query_and_stats(tmp_path: Path) -> None:
    async def go() -> None:
        kr = keyring()
        written = METRICS.value("edgepipe_store_bytes_written_total")
        async with await Store.open(tmp_path / "s.db", kr, device_id=DEVICE) as s:
            seqs = []
            for i in range(20):
                seqs.append(
                    await s.commit(
                        make_batch(s, i, device=f"boiler-{i % 2}"),
                        [DeadLetter(1, "t/x", "bad json", b"{", None)] if i == 3 else [],
                        [os.urandom(16) for _ in range(5)],
                        {"scale": f"state{i}".encode()},
                    )
                )
            assert seqs == list(range(1, 21))
            assert await s.commit(Batch(), keys=[b"x" * 16]) is None
            # flash-wear accounting: at least the WAL frames of 21 commits were written
            assert s.bytes_written >= 21 * 4096
            assert METRICS.value("edgepipe_store_bytes_written_total") - written == s.bytes_written
            assert METRICS.value("edgepipe_store_bytes_written_per_reading") > 0
            st = await s.stats()
            assert st["batches"] == 20 and st["readings"] == 1000
            assert st["unsynced_batches"] == 20 and st["sync_cursor"] == 0
            await s.mark_synced([1, 2, 3, 5])
            st = await s.stats()
            assert st["sync_cursor"] == 3 and st["unsynced_batches"] == 16
            assert st["oldest_unsynced_ms"] == 1_700_000_000_000 + 3 * 1000
            got = [
                r
                async for r in s.query(
                    device="boiler-1",
                    metric="temp",
                    since_ms=1_700_000_000_000 + 5000,
                    until_ms=1_700_000_000_000 + 9000,
                )
            ]
            # batches 5 and 7 are boiler-1; odd j are temp: 25 each
            assert len(got) == 50
            assert {r.device for r in got} == {"boiler-1"}
            assert all(r.tags == {"room": "r1"} for r in got)
            assert all(1_700_000_000_000 + 5000 <= r.ts < 1_700_000_000_000 + 9000 for r in got)
            assert await s.count() == 1000
            dl = await s.dead_letters()
            assert dl == [DeadLetter(1, "t/x", "bad json", b"{", None)]
        async with await Store.open(tmp_path / "s.db", kr, device_id=DEVICE) as s:
            assert await s.load_states() == {"scale": b"state19"}
            assert await s.seen([b"x" * 16, b"y" * 16]) == {b"x" * 16}
            assert (await s.verify())["batches"] == 20
            # a new batch after reopening continues the sequence
            assert await s.commit(make_batch(s, 99)) == 21

    run(go())


def test_refuses_other_device_and_missing_file(tmp_path: Path) -> None:
    async def go() -> None:
        kr = keyring()
        async with await Store.open(tmp_path / "s.db", kr, device_id=DEVICE) as s:
            await s.commit(make_batch(s, 0))
        with pytest.raises(StoreError, match="belongs to another device"):
            await Store.open(tmp_path / "s.db", kr, device_id="other")
        with pytest.raises(StoreError, match="no store there"):
            await Store.open(tmp_path / "nope.db", kr, device_id=DEVICE, create=False)
        assert not (tmp_path / "nope.db").exists()

    run(go())


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version=99")
    con.close()
    with pytest.raises(StoreError, match="newer edgepipe"):
        run(Store.open(db, keyring(), device_id=DEVICE))


def _fill(store: Store, start: int, count: int, n: int = 200):
    async def go() -> list[int]:
        out = []
        for i in range(start, start + count):
            out.append(await store.commit(make_batch(store, i, n)))
        return out

    return go()


def test_quota_evicts_synced_first_then_backpressure(tmp_path: Path) -> None:
    async def go() -> None:
        kr = keyring()
        quota = 256 * 1024
        async with await Store.open(
            tmp_path / "s.db", kr, device_id=DEVICE, quota_bytes=quota
        ) as s:
            seqs = []
            with pytest.raises(StoreFullError, match="quota"):
                while True:
                    seqs.append(await s.commit(make_batch(s, len(seqs), 200)))
            n_full = len(seqs)
            st = await s.stats()
            assert st["used_bytes"] <= quota and st["batches"] == n_full
            # nothing was written by the refused commit; sync half, and room appears
            await s.mark_synced(seqs[: n_full // 2])
            nxt = await s.commit(make_batch(s, 999, 200))
            assert nxt == n_full + 1  # sequence numbers never come back
            st = await s.stats()
            assert st["evicted_batches"] > 0 and st["used_bytes"] <= quota
            assert st["unsynced_batches"] == n_full - n_full // 2 + 1  # no unsynced dropped
            remaining = {sb.seq for sb in await s.batches()}
            assert set(seqs[n_full // 2 :]) <= remaining
            await s.verify()

    run(go())


def test_quota_drop_oldest_counts_and_keeps_file_bounded(tmp_path: Path) -> None:
    async def go() -> None:
        kr = keyring()
        quota = 256 * 1024
        before = METRICS.value("edgepipe_readings_dropped_total", stage="store", reason="quota")
        async with await Store.open(
            tmp_path / "s.db", kr, device_id=DEVICE, quota_bytes=quota, on_full="drop_oldest"
        ) as s:
            seqs = await _fill(s, 0, 300)
            assert seqs == list(range(1, 301))
            st = await s.stats()
            assert st["used_bytes"] <= quota
            assert st["db_bytes"] <= quota * 1.3  # incremental vacuum gave pages back
            dropped = (
                METRICS.value("edgepipe_readings_dropped_total", stage="store", reason="quota")
                - before
            )
            assert dropped == 200 * st["evicted_batches"] > 0
            kept = [sb.seq for sb in await s.batches()]
            assert kept == list(range(301 - len(kept), 301))  # the newest survive
            assert (await s.verify())["batches"] == len(kept)

    run(go())


def test_key_usage_limit_forces_rotation(tmp_path: Path, caplog) -> None:
    from protocol._keys import KEY_REFUSE_AT, KEY_WARN_AT

    db = tmp_path / "s.db"
    k1, k2 = generate_key_line("k1"), generate_key_line("k2")

    async def go() -> None:
        async with await Store.open(db, Keyring.parse(k1, "t"), device_id=DEVICE) as s:
            await s.commit(make_batch(s, 0))
        # pretend k1 has sealed close to the warning and the refusal thresholds
        con = sqlite3.connect(db)
        con.execute("UPDATE meta SET v=? WHERE k='uses:k1'", (KEY_WARN_AT - 1,))
        con.commit()
        con.close()
        async with await Store.open(db, Keyring.parse(k1, "t"), device_id=DEVICE) as s:
            await s.commit(make_batch(s, 1))
            assert "rotate it soon" in caplog.text
            await s._run(
                lambda con: con.execute(
                    "UPDATE meta SET v=? WHERE k='uses:k1'", (KEY_REFUSE_AT - 1,)
                )
            )
        async with await Store.open(db, Keyring.parse(k1, "t"), device_id=DEVICE) as s:
            await s.commit(make_batch(s, 2))  # reaches the limit
            with pytest.raises(StoreError, match="rotate it"):
                await s.commit(make_batch(s, 3))
            assert (await s.stats())["key_seals"] == KEY_REFUSE_AT
        # rotation: a fresh active key writes again, old rows stay readable
        async with await Store.open(db, Keyring.parse(k1 + "\n" + k2, "t"), device_id=DEVICE) as s:
            assert await s.commit(make_batch(s, 3)) == 4
            assert len(await s.batches()) == 4
            assert (await s.stats())["key_seals"] == 1

    asyncio.run(go())


def test_a_reader_resolves_series_a_running_writer_added_after_it_opened(tmp_path: Path) -> None:
    """`edgepipe export`/`status` and tests open the store while `edgepipe run` writes:
    batches read later may use series committed after the reader loaded its registry."""

    async def go() -> None:
        kr = keyring("k1")
        async with await Store.open(tmp_path / "s.db", kr, device_id=DEVICE) as writer:
            await writer.commit(make_batch(writer, 0, n=3))
            async with await Store.open(
                tmp_path / "s.db", kr, device_id=DEVICE, create=False
            ) as reader:
                await writer.commit(make_batch(writer, 1, n=3, device="new-device"))
                got = await reader.batches()
                devices = [reader.registry.key(s).device for sb in got for s in sb.batch.series]
                assert devices == ["boiler-1"] * 3 + ["new-device"] * 3
                await writer.commit(make_batch(writer, 2, n=3, device="newer-device"))
                rows = [r async for r in reader.query(device="newer-device")]
                assert len(rows) == 3

    run(go())
