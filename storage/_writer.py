"""The store's SQLite connection and the thread it runs on.

The one module that touches aiosqlite's private API: a whole transaction runs as one
function on aiosqlite's worker thread with the raw :class:`sqlite3.Connection` (one thread
hop per commit, sealing included, instead of one per statement), so the event loop keeps
reading MQTT while SQLite writes and fsyncs.  SQLite errors come back as
:class:`~core._errors.StoreError` (or :class:`~core._errors.StoreFullError`)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from core._errors import StoreError, StoreFullError

__all__ = ["ThreadIO", "Writer", "configure"]

T = TypeVar("T")


class ThreadIO:
    """Bytes this thread passed to write(2): SQLite's writes, read on its worker thread."""

    def __init__(self) -> None:
        self._fd: int | None = None
        try:
            self._fd = os.open("/proc/thread-self/io", os.O_RDONLY)
        except OSError:
            pass

    def wchar(self) -> int:
        if self._fd is None:
            return 0
        data = os.pread(self._fd, 512, 0)
        for line in data.split(b"\n"):
            if line.startswith(b"wchar:"):
                return int(line.split()[1])
        return 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _is_full(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None) or 0
    if code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        return True
    msg = str(e).lower()
    return "full" in msg or "disk i/o" in msg or "no space" in msg


def make_private(path: Path) -> None:
    """Create the database file 0600 whatever the umask (SQLite then gives its -wal and
    -shm the same mode), and take group and other access away from existing store files."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError:
        return  # a missing directory etc.: connecting reports it
    else:
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            st = os.stat(f)
            if st.st_mode & 0o077 and st.st_uid == os.getuid():
                os.chmod(f, st.st_mode & 0o700)
        except OSError:
            pass


def configure(con: sqlite3.Connection, path: Path, synchronous: str) -> None:
    """The connection's settings: WAL, ``synchronous``, zeroed deletes, a bounded WAL."""
    con.execute("PRAGMA busy_timeout=10000")
    if con.execute("PRAGMA page_count").fetchone()[0] == 0:  # a new file (setting it
        con.execute("PRAGMA auto_vacuum=INCREMENTAL")  # on an old one writes the header)
    mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise StoreError(f"{path}: cannot enable WAL mode (got {mode})")
    con.execute(f"PRAGMA synchronous={synchronous}")
    con.execute("PRAGMA secure_delete=ON")  # deleted rows are zeroed, not left behind
    con.execute("PRAGMA journal_size_limit=4194304")  # WAL shrinks back after checkpoints
    con.execute("PRAGMA foreign_keys=ON")
    # the writer appends and reads little back (identities of possible redeliveries, the
    # oldest batches to sync): a 512 KiB page cache instead of SQLite's 2 MB default
    con.execute("PRAGMA cache_size=-512")


class Writer:
    """One aiosqlite connection; :meth:`run` calls a function on its worker thread."""

    def __init__(self, db: aiosqlite.Connection, path: Path, io: ThreadIO) -> None:
        self._db = db
        self.path = path
        #: the worker thread's write(2) counter
        self.io = io
        self.closed = False

    @classmethod
    async def connect(cls, path: Path) -> Writer:
        if str(path) != ":memory:":
            make_private(path)
        db = await aiosqlite.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            io = await db._execute(ThreadIO)  # opened on the worker thread, for that thread
        except BaseException:
            await db.close()
            raise
        return cls(db, path, io)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(con, *args)`` on the worker thread; a SQLite error rolls back the open
        transaction and raises StoreFullError (disk full, write error) or StoreError."""
        if self.closed:
            raise StoreError("the store is closed")
        db = self._db

        def call() -> T:
            try:
                return fn(db._conn, *args)
            except sqlite3.DatabaseError as e:
                con = db._conn
                if con.in_transaction:
                    try:
                        con.rollback()
                    except sqlite3.Error:
                        pass
                if _is_full(e):
                    raise StoreFullError(f"{self.path}: disk full or write error: {e}") from None
                raise StoreError(f"{self.path}: damaged or not an edgepipe store: {e}") from None

        return await db._execute(call)

    async def close(self, optimize: bool = True) -> None:
        """Close the connection (after ``PRAGMA optimize``); idempotent."""
        if self.closed:
            return
        self.closed = True
        db = self._db

        def fin() -> None:
            if optimize:
                try:
                    db._conn.execute("PRAGMA optimize")
                except sqlite3.Error:
                    pass
            self.io.close()

        try:
            await db._execute(fin)
        except Exception:
            pass
        await db.close()
