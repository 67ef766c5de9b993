"""Storage behind one narrow interface per role, with the algorithms written once.

The web app talks to a :class:`Backend`, which is the four roles together, each a small
Protocol in its own module:

* :class:`~cloud._devices.Devices` -- registered devices, their sealed secrets, the master
  key (add, list, get, secrets, re-wrap);
* :class:`~cloud._ingest.Ingest` -- uploads, idempotent on (device, seq), and their nonces;
* :class:`~cloud._queries.Queries` -- readings, rollups, the logs and the fleet's status;
* :class:`~cloud._operators.Operators` -- dashboard operators and their sessions.

:class:`SQLBackend` implements every role once, in portable SQL, on top of the dialect
hooks of :class:`~cloud._sql.SQLBase` that the two concrete backends fill in
(:mod:`cloud._sqlite`, :mod:`cloud._postgres`).  Every method blocks; the app runs them in
worker threads.  The backend raises domain errors only (:mod:`cloud._errors`).
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from ._devices import Devices, DevicesSQL
from ._errors import CloudError, NoDatabase
from ._health import Health, HealthSQL
from ._ingest import Ingest, IngestResult, IngestSQL
from ._operators import Operators, OperatorsSQL
from ._queries import Queries, QueriesSQL, ReadingsQuery
from ._schema import SCHEMA_VERSION, SchemaSQL
from ._secrets import MasterKey
from ._sql import ROLLUP_MS

__all__ = [
    "ROLLUP_MS",
    "SCHEMA_VERSION",
    "Backend",
    "Devices",
    "Ingest",
    "IngestResult",
    "Operators",
    "Queries",
    "ReadingsQuery",
    "SQLBackend",
    "open_backend",
    "redacted_url",
]


@runtime_checkable
class Backend(Devices, Ingest, Queries, Operators, Health, Protocol):
    """What the receiver needs from storage: every role, plus its lifetime.  Device secrets
    are stored sealed with ``master_key``; without one the backend serves everything except
    device secrets."""

    def initialised(self) -> bool:
        """Whether the database holds an edgepipe-cloud schema (read only)."""

    def init(self) -> None:
        """Create or migrate the schema (idempotent).  With a master key: refuse a key that
        is not the one the database was sealed with (:class:`MasterKeyError`, nothing
        written), then seal any secret still stored in plaintext."""

    def close(self) -> None: ...


class SQLBackend(SchemaSQL, DevicesSQL, HealthSQL, IngestSQL, QueriesSQL, OperatorsSQL):
    """Every role, in SQL both dialects accept; subclasses supply the dialect hooks."""

    def __enter__(self) -> SQLBackend:
        return self

    def init(self) -> None:
        with self._write() as cur:
            self._migrate(cur)
            if self.master_key is not None:
                self._adopt_master_key(cur, self.master_key)


class BadDatabaseURL(CloudError):
    """A ``--db`` URL edgepipe-cloud cannot use (an unknown scheme, a bad ``?schema=``): a
    usage error, nothing was opened.  ``url`` is shown without its password."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = redacted_url(url), reason
        super().__init__(f"database URL {self.url}: {reason}")


def open_backend(url: str, *, master_key: MasterKey | None = None, create: bool = True) -> Backend:
    """``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (the SQLAlchemy
    convention), a bare path, or ``postgresql://user@host:port/db`` (optionally
    ``?schema=name``).  The schema is created or migrated; with ``master_key`` it is checked
    against the database and plaintext device secrets are sealed with it.

    With ``create=False`` a database that does not exist yet (no SQLite file, or no
    edgepipe-cloud tables in the PostgreSQL database or schema) raises :class:`NoDatabase`
    and nothing is created."""
    if url.startswith(("postgresql://", "postgres://")):
        from ._postgres import PostgresBackend

        where = redacted_url(url)
        backend: Backend = PostgresBackend(url, create=create)
    else:
        from ._sqlite import SQLiteBackend

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
            from ._sqlite import holds_schema

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


def redacted_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
