"""A full disk is survived: nothing half-written, no ack for data not stored, recovery when
space returns.  SQLite's max_page_count in-process, and a real tmpfs under a running
edgepipe process."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from core._errors import StoreFullError
from core._model import Batch
from storage import Keyring, Store, generate_key_line
from tests.helpers.edge import make_config, publish, reading_msg, wait_for


def test_sqlite_full_rolls_back_and_recovers(tmp_path: Path) -> None:
    async def go() -> None:
        kr = Keyring.parse(generate_key_line(), "test")
        async with await Store.open(tmp_path / "s.db", kr, device_id="d") as s:
            pages = await s._run(lambda con: con.execute("PRAGMA page_count").fetchone()[0])
            await s._run(lambda con: con.execute(f"PRAGMA max_page_count={pages + 30}"))
            sid = s.registry.intern("dev", "temp")
            committed = []
            with pytest.raises(StoreFullError, match="full"):
                for i in range(1000):
                    b = Batch([i * 1000 + j for j in range(300)], [float(j) for j in range(300)],
                              [sid] * 300)  # fmt: skip
                    committed.append(await s.commit(b, keys=[bytes([i % 256]) * 16]))
            assert len(committed) > 3
            # the refused batch left nothing behind; the store still works for reading
            assert [sb.seq for sb in await s.batches()] == committed
            assert (await s.stats())["last_seq"] == committed[-1]
            # space returns: the same batch commits, with the next sequence number
            await s._run(lambda con: con.execute("PRAGMA max_page_count=1000000"))
            assert await s.commit(b) == committed[-1] + 1
            await s.verify()

    asyncio.run(go())


@pytest.fixture
def tmpfs(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _count(db: Path, keyfile: Path) -> int:
    async def go() -> int:
        async with await Store.open(db, Keyring.from_file(keyfile), device_id="test-device") as s:
            return (await s.stats())["readings"]

    return asyncio.run(go())


def test_disk_full_under_a_running_edgepipe(tmp_path, tmpfs, broker, keyfile, edge) -> None:
    db = tmpfs / "store.db"
    ballast = tmpfs / "ballast"
    cfg = make_config(
        tmp_path,
        broker,
        keyfile,
        store={"path": str(db), "key": {"file": str(keyfile)}},
        batch={"max_messages": 200, "max_delay_ms": 10},
    )
    proc = edge(cfg)
    proc.wait_subscribed()
    # leave ~250 KiB free on the 2 MiB filesystem
    free = lambda: __import__("os").statvfs(tmpfs).f_bavail * 4096  # noqa: E731
    ballast.write_bytes(b"\0" * (free() - 250 * 1024))
    n = 6000
    publish(broker, [reading_msg(f"dev{i % 50}", f"m{i % 7}", i, i * 0.5) for i in range(n)])
    proc.wait_metric("edgepipe_store_full", 1, 60)
    assert proc.alive(), "edgepipe must not crash on a full disk"
    assert proc.readyz() == (503, "not ready: store is not writable")
    assert "ALARM" in proc.output()  # the alarm line is what the operator sees
    stored_while_full = _count(db, keyfile)
    assert stored_while_full < n
    # while full: nothing more is acknowledged than was durably stored
    assert proc.metric("edgepipe_messages_acked_total") <= proc.metric(
        "edgepipe_readings_stored_total"
    )
    ballast.unlink()  # space returns
    wait_for(lambda: proc.metric("edgepipe_store_full") == 0, 60, "recovery")
    wait_for(lambda: _count(db, keyfile) >= n, 60, "every message to arrive")
    proc.wait_metric("edgepipe_messages_acked_total", n, 30)
    assert proc.readyz() == (200, "ready")
    assert proc.terminate() == 0
    assert _count(db, keyfile) == n  # all of them, once each
    assert "Traceback" not in proc.output()
