"""Power cuts, simulated on the real files of real processes (tests/helpers/powercut.py).

A kill -9 leaves the page cache to the kernel, which writes it out later; a power cut loses
whatever was not fsynced, or any part of it, torn at sector boundaries.  Each test records
the file operations of the process under test, cuts it at a random moment, rebuilds the
disk as a power cut could have left it, and checks the promise on that disk:

* the store opens, passes SQLite's integrity check and decrypts every row;
* every batch that ``commit`` reported (hence every reading acknowledged to the broker)
  is there;
* end to end, every QoS 1 message published is stored exactly once after the restarts.

A control run with ``synchronous=NORMAL`` shows that the simulation does catch a store that
reports commits before they are durable, which kill -9 alone never shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path

import pytest

from core._errors import StoreError
from storage import Keyring, Store
from tests.helpers.crash import DEVICE, kill_after_some_commits
from tests.helpers.crash import spawn as _spawn
from tests.helpers.edge import wait_for
from tests.helpers.mqtt import Publisher, config, drain, seq_message, started
from tests.helpers.powercut import PowerCut, build_shim
from tests.helpers.store import assert_exactly, stored_values


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_shim(tmp_path_factory.mktemp("powercut"))
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


async def _found(db: Path, keyfile: Path, device: str = DEVICE) -> dict[int, int] | str:
    """seq -> readings of a store image, or the error that opening/verifying it raised."""
    try:
        store = await Store.open(db, Keyring.from_file(keyfile), device_id=device, create=False)
    except StoreError as e:
        return f"{type(e).__name__}: {e}"
    try:
        await store.verify()  # integrity_check, every row decrypts in place, none missing
        return {sb.seq: len(sb.batch) for sb in await store.batches()}
    except StoreError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        await store.close()


def _cut_writer(
    cut: PowerCut, db: Path, keyfile: Path, rnd: random.Random, sync: str = "FULL"
) -> set[int]:
    """Run the store writer under the recorder; cut the power after a random number of
    commits at a random moment.  Returns the sequence numbers it reported committed."""
    proc = _spawn("write", str(db), str(keyfile), "0", "0", sync, env=cut.arm())
    return kill_after_some_commits(proc, rnd, 40, 0.03)


def test_power_cut_keeps_every_reported_commit(tmp_path: Path, keyfile: Path, shim: Path) -> None:
    d = tmp_path / "store"
    d.mkdir()
    db = d / "store.db"
    cut = PowerCut(shim, d, tmp_path / "ops.log")
    rnd = random.Random(11)
    committed: set[int] = set()
    report = []
    for run in range(8):
        committed |= _cut_writer(cut, db, keyfile, rnd)
        # nothing unsynced survived; each of two random subsets, torn by sector
        for keep, seed in (("none", 0), ("random", 100 + run), ("random", 200 + run)):
            img = tmp_path / f"img-{run}-{keep}-{seed}"
            st = cut.image(img, keep=keep, seed=seed)
            found = asyncio.run(_found(img / "store.db", keyfile))
            assert isinstance(found, dict), f"run {run}, {keep}/{seed}: {found}"
            missing = committed - set(found)
            assert not missing, f"run {run}, {keep}/{seed}: reported commits lost: {missing}"
            assert all(found[s] == 100 for s in committed)
            report.append((run, keep, st.unsynced, st.unsynced_kept, st.sectors_dropped))
        # a random cut becomes the disk the next run starts from
        cut.image(keep="random", seed=run)
    print(f"\npower cuts (run, image, unsynced ops, kept, sectors dropped): {json.dumps(report)}")
    assert len(committed) >= 8 * 5
    # the cuts really fell among writes the process had not synced yet
    assert sum(r[2] for r in report) > 0
    assert sum(r[4] for r in report) > 0


def test_the_simulation_catches_commits_reported_before_they_are_durable(
    tmp_path: Path, keyfile: Path, shim: Path
) -> None:
    """The same writer with synchronous=NORMAL (never allowed by edgepipe's config): a kill
    -9 keeps every commit, a power cut loses reported ones."""
    d = tmp_path / "store"
    d.mkdir()
    db = d / "store.db"
    cut = PowerCut(shim, d, tmp_path / "ops.log")
    committed = _cut_writer(cut, db, keyfile, random.Random(3), sync="NORMAL")
    cut.image(tmp_path / "killed", keep="all")
    after_kill = asyncio.run(_found(tmp_path / "killed" / "store.db", keyfile))
    assert isinstance(after_kill, dict) and committed <= set(after_kill)
    cut.image(tmp_path / "cut", keep="none")
    after_cut = asyncio.run(_found(tmp_path / "cut" / "store.db", keyfile))
    assert isinstance(after_cut, str) or committed - set(after_cut), after_cut


def test_power_cuts_end_to_end_store_every_message_once(
    tmp_path: Path, broker, keyfile: Path, edge, shim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """edgepipe under a QoS 1 stream, its power cut 3 times mid-commit: after each cut it restarts on a
    disk holding a random torn subset of its unsynced writes, and the broker redelivers what
    it never acknowledged.  In the end every message is stored exactly once."""
    n = 20000
    d = tmp_path / "data"
    d.mkdir()
    db = d / "store.db"
    cfg = config(
        tmp_path,
        broker,
        keyfile,
        broker={"client_id": "edgepipe-powercut"},
        store={"path": str(db), "key": {"file": str(keyfile)}},
    )
    cut = PowerCut(shim, d, tmp_path / "ops.log")
    rng = random.Random(5)

    def start():  # noqa: ANN202
        for k, v in cut.arm().items():
            monkeypatch.setenv(k, v)
        try:
            return started(edge, cfg)
        finally:
            for k in ("LD_PRELOAD", "POWERCUT_DIR", "POWERCUT_LOG"):
                monkeypatch.delenv(k)

    proc = start()
    pub = Publisher(broker, [seq_message(i) for i in range(n)], rate=3000)
    pub.start()
    report = []
    for i in range(3):
        time.sleep(rng.uniform(0.3, 0.9))  # a random moment to cut at (input), not a wait
        # cut in the middle of a commit: written, not yet synced.  The window lasts
        # microseconds, so this polls the operation log without sleeping; the deadline only
        # bounds a failure (the stream has 20,000 messages: commits go on for seconds)
        deadline = time.monotonic() + 60
        while not cut.unsynced():
            assert time.monotonic() < deadline, f"cut {i + 1}: no commit in flight for 60 s"
        proc.kill9()
        st = cut.image(keep="random", seed=i)
        report.append(
            {
                "stored after the cut": len(stored_values(db, keyfile)),
                "unsynced ops": st.unsynced,
                "kept": st.unsynced_kept,
                "sectors dropped": st.sectors_dropped,
            }
        )
        proc = start()
    pub.join_ok()
    print(f"\npower cuts during {n} QoS 1 messages: {json.dumps(report)}")
    wait_for(lambda: len(stored_values(db, keyfile)) >= n, 60, "all readings stored")
    drain(broker, proc, n)  # anything late (a duplicate) would come before the marker
    assert proc.terminate() == 0
    assert_exactly(stored_values(db, keyfile), n + 1)
    assert isinstance(asyncio.run(_found(db, keyfile, "test-device")), dict)
    # the cuts fell while the stream was flowing, and some were among unsynced writes
    assert all(0 < r["stored after the cut"] < n for r in report), report
