"""kill -9 of real writer processes: during heavy writes, and during re-encryption.

The writer (``tests/helpers/crash.py``) is a separate process: it commits batches as fast as it can and prints
each sequence number after ``commit`` returns.  Whatever it printed must be in the store
after the kill, decrypt, and the database must pass SQLite's integrity check.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from storage import Keyring, Store, generate_key_line
from tests.helpers.crash import DEVICE, kill_after_some_commits, read_until
from tests.helpers.crash import spawn as _spawn


async def _check(db: Path, keyfile: Path) -> dict[int, int]:
    async with await Store.open(db, Keyring.from_file(keyfile), device_id=DEVICE) as s:
        counts = await s.verify()  # integrity_check == ok, every row decrypts, none missing
        st = await s.stats()
        assert counts["batches"] + st["evicted_batches"] == st["last_seq"]
        return {sb.seq: len(sb.batch) for sb in await s.batches()}


@pytest.mark.parametrize("quota", [None, 400_000], ids=["plain", "evicting"])
def test_kill9_during_heavy_writes(tmp_path: Path, keyfile: Path, quota: int | None) -> None:
    """With a quota, kills also land in eviction rounds (delete, vacuum, checkpoint)."""
    db = tmp_path / "store.db"
    rnd = random.Random(7)
    committed: set[int] = set()
    report = []
    for run in range(12):
        proc = _spawn("write", str(db), str(keyfile), "0", str(quota or 0))
        committed |= kill_after_some_commits(proc, rnd, 60, 0.05)
        found = asyncio.run(_check(db, keyfile))
        expected = committed if not quota else {s for s in committed if s >= min(found)}
        missing = expected - set(found)
        assert not missing, f"run {run}: committed batches lost after kill -9: {sorted(missing)}"
        assert all(found[s] == 100 for s in expected)
        assert max(found) >= max(committed)
        report.append(
            {"run": run, "committed": len(committed), "found": len(found), "integrity": "ok"}
        )
    print(f"\nkill -9 x{len(report)} ({'quota' if quota else 'no quota'}): {json.dumps(report)}")
    assert len(committed) >= 12 * 5
    if quota:
        assert min(found) > 1  # evictions really happened in between the kills


def test_kill9_during_reencryption_then_resume(tmp_path: Path) -> None:
    keyfile = tmp_path / "store.key"
    keyfile.write_text(generate_key_line("old") + "\n")
    keyfile.chmod(0o600)
    db = tmp_path / "store.db"
    writer = _spawn("write", str(db), str(keyfile), "400", "0")
    out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    before = asyncio.run(_check(db, keyfile))
    assert len(before) == 400
    # rotate: a new active key, the old one stays for reading
    keyfile.write_text(keyfile.read_text() + generate_key_line("new") + "\n")

    proc = _spawn("reencrypt", str(db), str(keyfile))
    progress = read_until(proc, 8)  # eight chunks of 5 rows re-sealed, then kill -9
    proc.kill()
    proc.communicate()
    assert len(progress) == 8

    async def resume() -> dict[str, int]:
        async with await Store.open(db, Keyring.from_file(keyfile), device_id=DEVICE) as s:
            mid = await s.rows_by_key()
            assert mid.get("old", 0) > 0 and mid.get("new", 0) >= 30, mid  # really halfway
            await s.reencrypt(chunk=50)
            return await s.rows_by_key()

    assert set(asyncio.run(resume())) == {"new"}
    # the old key can go now: everything decrypts with the new one alone, nothing lost
    keyfile.write_text("\n".join(keyfile.read_text().splitlines()[1:]) + "\n")
    assert Keyring.from_file(keyfile).ids == ["new"]
    assert asyncio.run(_check(db, keyfile)) == before
