"""A store writer in its own process, to kill -9 (and to cut the power of).

Run as a script (``write DB KEYFILE COUNT QUOTA [SYNC]`` or ``reencrypt DB KEYFILE``) it
commits batches of 100 readings as fast as it can and prints each sequence number after
``commit`` returned, or re-seals the store in chunks of 5 rows printing the progress.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from storage import Keyring, Store

__all__ = ["DEVICE", "kill_after_some_commits", "read_until", "spawn"]

REPO = Path(__file__).resolve().parents[2]

DEVICE = "crash-dev"
HERE = Path(__file__).resolve()


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env=None if env is None else {**os.environ, **env},
    )


def read_until(proc: subprocess.Popen[str], n_lines: int, timeout: float = 60) -> list[str]:
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
    lines = read_until(writer, rnd.randint(5, most))
    time.sleep(rnd.random() * pause)  # a random moment to kill at (input), not a wait
    writer.kill()
    out, err = writer.communicate()
    lines += [x for x in out.split("\n") if x.strip()]
    assert lines, f"writer printed nothing: {err}"
    return {int(x) for x in lines}


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
