"""kill -9 of real writer processes: during heavy writes, and during re-encryption.

The writer is this file run as a script: it commits batches as fast as it can and prints
each sequence number after ``commit`` returns.  Whatever it printed must be in the store
after the kill, decrypt, and the database must pass SQLite's integrity check.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from storage import Keyring, Store, generate_key_line

DEVICE = "crash-dev"
HERE = Path(__file__).resolve()


def _spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env=None if env is None else {**os.environ, **env},
    )


def _read_until(proc: subprocess.Popen[str], n_lines: int, timeout: float = 60) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while len(lines) < n_lines and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
    return lines


def kill_after_some_commits(
    writer: subprocess.Popen[str], rnd: random.Random, most: int, pause: float
) -> set[int]:
    """Let a writer commit a random number of batches (5..most), kill -9 it at a random
    moment after that, and return the sequence numbers it reported committed."""
    lines = _read_until(writer, rnd.randint(5, most))
    time.sleep(rnd.random() * pause)
    writer.kill()
    out, err = writer.communicate()
    lines += [x for x in out.split("\n") if x.strip()]
    assert lines, f"writer printed nothing: {err}"
    return {int(x) for x in lines}


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
    progress = _read_until(proc, 8)  # eight chunks of 5 rows re-sealed, then kill -9
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


# -- the writer process ----------------------------------------------------------------


async def _writer(db: str, keyfile: str, count: int, quota: int, sync: str = "FULL") -> None:
    from core._model import Batch

    kr = Keyring.from_file(keyfile)
    opts: dict = {"quota_bytes": quota, "on_full": "drop_oldest"} if quota else {}
    opts["synchronous"] = sync
    async with await Store.open(db, kr, device_id=DEVICE, **opts) as s:
        i = 0
        while not count or i < count:
            b = Batch()
            sid = s.registry.intern(f"dev{i % 7}", "temp")
            for j in range(100):
                # incompressible values: the quota run must reach its quota whatever the pace
                b.append(1_700_000_000_000 + i * 100 + j, random.random(), sid)
            seq = await s.commit(b, keys=[random.randbytes(16) for _ in range(100)])
            print(seq, flush=True)
            i += 1


async def _reencrypt(db: str, keyfile: str) -> None:
    async with await Store.open(db, Keyring.from_file(keyfile), device_id=DEVICE) as s:
        await s.reencrypt(chunk=5, progress=lambda done, total: print(done, flush=True))


if __name__ == "__main__":
    mode, db, keyfile, *rest = sys.argv[1:]
    if mode == "write":
        asyncio.run(_writer(db, keyfile, int(rest[0]), int(rest[1]), *rest[2:]))
    else:
        asyncio.run(_reencrypt(db, keyfile))
