"""What an edge store holds, read back with the test's key (device ``test-device``)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from storage import Keyring, Store

__all__ = ["assert_exactly", "dead_letters", "stored", "stored_values"]


async def _contents(db: Path, keyfile: Path) -> tuple[list[float], list]:
    store = await Store.open(db, Keyring.from_file(keyfile), device_id="test-device")
    try:
        values = []
        for sb in await store.batches():
            values.extend(sb.batch.value)
        return values, await store.dead_letters()
    finally:
        await store.close()


def stored_values(db: Path, keyfile: Path) -> list[float]:
    """The value of every stored reading (the tests publish value == seq)."""
    if not db.exists():
        return []
    return asyncio.run(_contents(db, keyfile))[0]


def dead_letters(db: Path, keyfile: Path) -> list:
    return asyncio.run(_contents(db, keyfile))[1] if db.exists() else []


async def _stored(db: Path, keyfile: Path) -> list[tuple[str, str, int, float]]:
    store = await Store.open(db, Keyring.from_file(keyfile), device_id="test-device")
    try:
        out = []
        for sb in await store.batches():
            for r in sb.batch.readings(store.registry):
                out.append((r.device, r.metric, r.ts, r.value))
        return out
    finally:
        await store.close()


def stored(db: Path, keyfile: Path) -> list[tuple[str, str, int, float]]:
    """Every stored reading as (device, metric, ts, value)."""
    return asyncio.run(_stored(db, keyfile))


def assert_exactly(values: list[float], n: int) -> None:
    """``values`` are exactly the seqs 0..n-1: nothing missing, nothing twice."""
    counts = Counter(int(v) for v in values)
    dupes = sorted(s for s, c in counts.items() if c > 1)
    missing = sorted(set(range(n)) - set(counts))
    assert not dupes, f"{len(dupes)} duplicated readings, e.g. {dupes[:10]}"
    assert not missing, f"{len(missing)} missing readings, e.g. {missing[:10]}"
    assert len(values) == n
