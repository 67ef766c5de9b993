"""What every storage role is written against: a connection to one SQL database.

:class:`SQLBase` is the narrow dialect interface the two concrete backends fill in
(:mod:`cloud._sqlite`, :mod:`cloud._postgres`): ``_write()`` (a cursor inside one durable
write transaction), ``_read()`` (a cursor on one consistent snapshot), the DDL type names,
``_copy_readings`` and ``close``.  SQL is written with ``?`` placeholders; :meth:`_q` adapts
them.  The role implementations (devices, ingest, queries, operators) are written once on
top of it, in SQL both dialects accept (SQLite 3.35+ and PostgreSQL 13+: ``ON CONFLICT``,
``RETURNING``, integer division).  Every method blocks; the app runs them in worker threads.

Times are integer milliseconds since the Unix epoch throughout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ._errors import UnknownDevice

__all__ = ["ROLLUP_MS", "SQLBase"]

#: Width of the pre-aggregated buckets kept next to the raw readings (``readings_hourly``):
#: long ranges are downsampled from these instead of scanning every raw row.
ROLLUP_MS = 3_600_000


def tags_text(tags: tuple[tuple[str, str], ...]) -> str:
    return json.dumps(dict(tags), separators=(",", ":"), sort_keys=True) if tags else ""


def tags_obj(text: str) -> dict[str, str] | None:
    return json.loads(text) if text else None


def chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class SQLBase:
    """The dialect hooks and the few helpers every role shares."""

    AUTO_PK = "INTEGER PRIMARY KEY"
    DOUBLE = "REAL"
    BYTES = "BLOB"
    LOCK_ROW = ""  # "FOR UPDATE" where row locks exist
    #: One row when the table named by the parameter exists (in the current schema).
    TABLE_EXISTS = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"

    # -- dialect hooks -------------------------------------------------------------------
    def _write(self) -> AbstractContextManager[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _q(self, sql: str) -> str:
        return sql

    def _copy_readings(self, cur: Any, rows: list[tuple[int, int, float, int, int]]) -> None:
        cur.executemany(
            self._q("INSERT INTO readings (series_id, ts, val, flags, seq) VALUES (?, ?, ?, ?, ?)"),
            rows,
        )

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> SQLBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _device_id(self, cur: Any, name: str, lock: bool = False) -> int:
        lock_sql = f" {self.LOCK_ROW}" if lock and self.LOCK_ROW else ""
        cur.execute(self._q(f"SELECT id FROM devices WHERE name = ?{lock_sql}"), (name,))
        row = cur.fetchone()
        if row is None:
            raise UnknownDevice(name)
        return row[0]

    @staticmethod
    def _log_filter(
        device_col: str, order_col: str, device: str | None, before: int | None
    ) -> tuple[str, list[Any]]:
        clauses, args = [], []
        if device is not None:
            clauses.append(f"{device_col} = ?")
            args.append(device)
        if before is not None:
            clauses.append(f"{order_col} < ?")
            args.append(before)
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), args
