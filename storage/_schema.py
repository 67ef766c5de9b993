"""The store's SQL schema: its version (``PRAGMA user_version``), the forward-only
migrations that bring an older file up to it, and the ``meta`` table's values."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from core._errors import StoreError

from ._codec import stage_id
from ._keycheck import device_mac
from ._keyuse import KeyUses

__all__ = ["SCHEMA_VERSION", "meta", "migrate", "stored_version"]

log = logging.getLogger("edgepipe.store")

#: The SQL schema version (``PRAGMA user_version``); migrations below go forward only.
SCHEMA_VERSION = 3

_V1 = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY, key_id TEXT NOT NULL, blob BLOB NOT NULL,
    n INTEGER NOT NULL, t_min INTEGER, t_max INTEGER, synced INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS batches_unsynced ON batches(synced, seq);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, key_id TEXT NOT NULL, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY, key_id TEXT NOT NULL, blob BLOB NOT NULL,
    synced INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS filter_state (
    stage TEXT PRIMARY KEY, key_id TEXT NOT NULL, blob BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (
    id BLOB PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
"""


def meta(con: sqlite3.Connection, k: str, default: Any = None) -> Any:
    row = con.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
    return default if row is None else row[0]


def _migrate_v1(con: sqlite3.Connection, keys: KeyUses) -> None:
    for stmt in _V1.split(";"):
        if stmt.strip():
            con.execute(stmt)


def _migrate_v2(con: sqlite3.Connection, keys: KeyUses) -> None:
    """v2: stage names no longer in clear, sealed store secrets (message identity key),
    persistent sequence counters (eviction must never make a seq come back), message
    identities as an append-only log."""
    s = keys.sealer
    con.execute(
        "CREATE TABLE secrets (name TEXT PRIMARY KEY, key_id TEXT NOT NULL, blob BLOB NOT NULL)"
        " WITHOUT ROWID"
    )
    # v1 derived message identities from the active key: keep the same key so redeliveries
    # of messages stored before the upgrade are still recognised.
    ident = s.keyring.derive("message-identity")
    kid, blob = keys.seal("secrets", "identity", ident)
    con.execute("INSERT INTO secrets VALUES ('identity', ?, ?)", (kid, blob))
    con.execute(
        "CREATE TABLE filter_state2 (id BLOB PRIMARY KEY, key_id TEXT NOT NULL, "
        "blob BLOB NOT NULL) WITHOUT ROWID"
    )
    for stage, kid, blob in con.execute("SELECT stage, key_id, blob FROM filter_state").fetchall():
        plain = s.open("filter_state", stage, kid, blob)
        hid = stage_id(ident, stage)
        kid, blob = keys.seal("filter_state", hid.hex(), msgpack.packb([stage, plain]))
        con.execute("INSERT INTO filter_state2 VALUES (?, ?, ?)", (hid, kid, blob))
    con.execute("DROP TABLE filter_state")
    con.execute("ALTER TABLE filter_state2 RENAME TO filter_state")
    for k, q in (
        ("last_seq", "SELECT coalesce(max(seq), 0) FROM batches"),
        ("last_dl_seq", "SELECT coalesce(max(seq), 0) FROM dead_letters"),
    ):
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, con.execute(q).fetchone()[0]))
    con.execute("INSERT OR REPLACE INTO meta VALUES ('evicted', 0)")
    for kid in s.keyring.ids:  # the device id in clear gives way to a MAC per key
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"dev:{kid}", device_mac(s, kid)))
    # key check values become MACs (checked against schema 1's form before migrating)
    con.execute("DELETE FROM meta WHERE k LIKE 'kcv:%'")
    con.execute("DELETE FROM meta WHERE k='device'")
    # message identities: one appended row per commit (sequential writes; a keyed-hash
    # index of random ids dirtied a dozen pages per commit), the newest SEEN_KEEP kept
    con.execute("CREATE TABLE seen2 (n INTEGER PRIMARY KEY, ids BLOB NOT NULL)")
    ids = [r[0] for r in con.execute("SELECT id FROM seen ORDER BY seq")]
    for i in range(0, len(ids), 512):
        con.execute("INSERT INTO seen2 (ids) VALUES (?)", (msgpack.packb(ids[i : i + 512]),))
    con.execute("DROP TABLE seen")
    con.execute("ALTER TABLE seen2 RENAME TO seen")


def _migrate_v3(con: sqlite3.Connection, keys: KeyUses) -> None:
    """v3: the device's own records, each a sealed row: health snapshots and warning log
    records (``_logring``), kept until the receiver acknowledged them."""
    for table in ("health", "logs"):
        con.execute(
            f"CREATE TABLE {table} (seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, "
            "key_id TEXT NOT NULL, blob BLOB NOT NULL, synced INTEGER NOT NULL DEFAULT 0)"
        )
        con.execute(f"CREATE INDEX {table}_unsynced ON {table}(synced, seq)")


_MIGRATIONS: list[Callable[[sqlite3.Connection, KeyUses], None]] = [
    _migrate_v1,
    _migrate_v2,
    _migrate_v3,
]
assert len(_MIGRATIONS) == SCHEMA_VERSION


def stored_version(con: sqlite3.Connection, path: Path) -> int:
    """The file's schema version (0: a new file); refuses one from a newer edgepipe."""
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: written by a newer edgepipe (schema {version}, this one knows "
            f"{SCHEMA_VERSION}); refusing to open"
        )
    return version


def migrate(con: sqlite3.Connection, version: int, keys: KeyUses, path: Path) -> None:
    """Bring a file of schema ``version`` to :data:`SCHEMA_VERSION`, one transaction per
    step (a kill between steps resumes at the next open)."""
    for v in range(version, SCHEMA_VERSION):
        con.execute("BEGIN IMMEDIATE")
        try:
            _MIGRATIONS[v](con, keys)
            con.execute(f"PRAGMA user_version={v + 1}")
            keys.flush(con)
            con.execute("COMMIT")
        except BaseException:
            keys.abort(con)
            raise
        if version > 0:
            log.info("%s: migrated the store schema to version %d", path, v + 1)
