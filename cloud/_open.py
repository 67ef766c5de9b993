"""``open_backend(url)``: the backend a database URL names (SQLite or PostgreSQL), created
or migrated, its master key checked.  Above the backends, which it imports."""

from __future__ import annotations

import os

from ._backend import Backend
from ._errors import BadDatabaseURL, NoDatabase
from ._secrets import MasterKey
from ._sqlite import SQLiteBackend, holds_schema
from ._url import redacted_url

__all__ = ["open_backend"]


def open_backend(url: str, *, master_key: MasterKey | None = None, create: bool = True) -> Backend:
    """``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (the SQLAlchemy
    convention), a bare path, or ``postgresql://user@host:port/db`` (optionally
    ``?schema=name``).  The schema is created or migrated; with ``master_key`` it is checked
    against the database and plaintext device secrets are sealed with it.

    With ``create=False`` a database that does not exist yet (no SQLite file, or no
    edgepipe-cloud tables in the PostgreSQL database or schema) raises :class:`NoDatabase`
    and nothing is created."""
    if url.startswith(("postgresql://", "postgres://")):
        from ._postgres import PostgresBackend  # psycopg only for a PostgreSQL URL

        where = redacted_url(url)
        backend: Backend = PostgresBackend(url, create=create)
    else:
        if url.startswith("sqlite:///"):
            path = url.removeprefix("sqlite:///")
        elif "://" in url:
            raise BadDatabaseURL(
                url,
                f"unsupported scheme {url.split('://')[0]!r} (sqlite:///PATH or "
                "postgresql://user@host:port/db)",
            )
        else:
            path = url
        where = path if path == ":memory:" else os.path.abspath(path)
        if not create and path != ":memory:":
            if not os.path.isfile(path):
                raise NoDatabase(url, where, "no such file")
            if not holds_schema(path):
                raise NoDatabase(url, where, "it holds no edgepipe-cloud tables")
        backend = SQLiteBackend(path)
    backend.master_key = master_key
    try:
        if not create and not backend.initialised():
            raise NoDatabase(url, where, "it holds no edgepipe-cloud tables")
        backend.init()
    except BaseException:
        backend.close()
        raise
    return backend
