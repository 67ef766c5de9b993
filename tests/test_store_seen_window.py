"""How long the store remembers message identities (redelivery de-duplication)."""

from __future__ import annotations

import asyncio
import os

from core._model import Batch
from storage import Keyring, Store


def _run(tmp_path, keyfile, window: float, commits: int) -> tuple[int, set[bytes]]:
    async def go() -> tuple[int, set[bytes]]:
        store = await Store.open(tmp_path / "s.db", Keyring.from_file(keyfile), device_id="d")
        store.SEEN_WINDOW_S = window
        store.SEEN_KEEP = 100
        sid = store.registry.intern("dev", "m")
        first = [os.urandom(16) for _ in range(3)]
        for i in range(commits):
            keys = first if i == 0 else [os.urandom(16) for _ in range(3)]
            await store.commit(Batch([1_700_000_000_000 + i], [float(i)], [sid]), keys=keys)
        rows = await store._run(lambda con: con.execute("SELECT count(*) FROM seen").fetchone()[0])
        found = await store.seen(first)
        await store.close()
        return rows, found

    return asyncio.run(go())


def test_identities_are_kept_for_the_window(tmp_path, keyfile):
    rows, found = _run(tmp_path, keyfile, window=3600, commits=300)
    assert rows == 300 and len(found) == 3  # inside the time window: nothing forgotten


def test_old_identities_are_forgotten_past_count_and_window(tmp_path, keyfile):
    rows, found = _run(tmp_path, keyfile, window=0, commits=300)
    assert 100 <= rows < 300 and found == set()  # pruned down towards SEEN_KEEP
