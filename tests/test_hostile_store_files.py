"""Another local user reading the store: the database and its -wal/-shm are 0600 whatever
the umask, and an existing store left group/world readable is tightened when opened."""

from __future__ import annotations

import asyncio
import os
import stat

from core._model import Batch
from protocol._keys import Keyring
from storage import Store


async def _write(db, keyfile) -> None:
    store = await Store.open(db, Keyring.from_file(keyfile), device_id="d")
    try:
        sid = store.registry.intern("d", "T")
        await store.commit(Batch([1], [1.0], [sid]), [], [b"k" * 16], {})
        for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            assert f.exists(), f
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        await store.close()


def test_store_files_are_0600_whatever_the_umask(tmp_path, keyfile):
    old = os.umask(0)
    try:
        asyncio.run(_write(tmp_path / "store.db", keyfile))
        loose = tmp_path / "old.db"
        asyncio.run(_write(loose, keyfile))
        loose.chmod(0o644)
        asyncio.run(_write(loose, keyfile))
    finally:
        os.umask(old)
