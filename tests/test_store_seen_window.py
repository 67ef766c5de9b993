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


def _lookups(tmp_path, keyfile, fn):
    async def go():
        store = await Store.open(tmp_path / "f.db", Keyring.from_file(keyfile), device_id="d")
        try:
            return await fn(store, store.registry.intern("dev", "m"))
        finally:
            await store.close()

    return asyncio.run(go())


def _commit(store, sid, i, keys):
    return store.commit(Batch([1_700_000_000_000 + i], [float(i)], [sid]), keys=keys)


def test_seen_lookups_are_exact_with_the_filter(tmp_path, keyfile):
    async def fn(store, sid):
        before = [os.urandom(16) for _ in range(50)]
        await _commit(store, sid, 0, before)
        # the first lookup builds the filter from the table
        assert await store.seen(before[:10] + [os.urandom(16)]) == set(before[:10])
        assert store._seen_filter.active
        after = [os.urandom(16) for _ in range(50)]
        await _commit(store, sid, 1, after)  # added to the filter by the commit
        strangers = [os.urandom(16) for _ in range(2000)]
        assert await store.seen(strangers) == set()
        assert await store.seen(before + after + strangers[:5]) == set(before + after)
        # a key sharing every probed bit with a stored one (it differs only in the top byte
        # of each 32-bit word, above the probes' 23 bits): the filter cannot rule it out,
        # the table answers
        twin = bytes(b ^ 0xFF if i % 4 == 3 else b for i, b in enumerate(before[0]))
        assert store._seen_filter.candidates(None, {twin}) == {twin}
        assert await store.seen([twin, before[0]]) == {before[0]}

    _lookups(tmp_path, keyfile, fn)


def test_seen_filter_is_dropped_when_idle_and_rebuilt_exactly(tmp_path, keyfile):
    from storage._seenfilter import IDLE_COMMITS

    async def fn(store, sid):
        first = [os.urandom(16) for _ in range(3)]
        await _commit(store, sid, 0, first)
        assert await store.seen(first) == set(first)
        later = []
        for i in range(IDLE_COMMITS + 1):  # commits with no lookup: the filter goes
            later.append(os.urandom(16))
            await _commit(store, sid, i + 1, [later[-1]])
        assert not store._seen_filter.active
        later.append(os.urandom(16))
        await _commit(store, sid, 999, [later[-1]])  # while there is no filter
        # rebuilt from the table at the next lookup: the identities committed while there
        # was none are in it
        assert await store.seen(first + later + [os.urandom(16)]) == set(first + later)
        assert store._seen_filter.active

    _lookups(tmp_path, keyfile, fn)
