"""The SQLite backend: embedded, WAL, ``synchronous=FULL`` (a commit survives power loss).

The database holds operators' password hashes and sealed device secrets, so a new database
file is created mode 0600 whatever the umask (SQLite gives its -wal and -shm files the mode
of the database file).

One writer connection behind a lock (SQLite has one writer anyway) and one reader connection
per worker thread, so dashboard reads never wait for an ingest.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._backend import SQLBackend

__all__ = ["SQLiteBackend", "holds_schema"]

_HEADER = b"SQLite format 3\0"


def holds_schema(path: str) -> bool:
    """Whether the file at ``path`` is a SQLite database with edgepipe-cloud tables; read
    only: an empty file or another program's database is left exactly as it is."""
    with open(path, "rb") as f:
        if f.read(len(_HEADER)) != _HEADER:
            return False
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error:
        return False
    try:
        row = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()
    return row is not None


class SQLiteBackend(SQLBackend):
    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            if not path.startswith("file:"):
                _create_private(path)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self._writer = self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("backend is closed")
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        # SQLite's own lower() folds ASCII only; the log search is case-insensitive in every
        # script, as on PostgreSQL.  No index or stored value depends on lower().
        conn.create_function("lower", 1, _lower, deterministic=True)
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[Any]:
        with self._lock:
            cur = self._writer.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    @contextmanager
    def _read(self) -> Iterator[Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        cur = conn.cursor()
        cur.execute("BEGIN")  # one consistent snapshot per read
        try:
            yield cur
        finally:
            cur.execute("COMMIT")
            cur.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock, self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()


def _create_private(path: str) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (an existing file is kept)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
    finally:
        os.close(fd)


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value
