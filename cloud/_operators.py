"""The operators role: dashboard operators (password hashes only) and their sessions."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from core._clock import now_ms

from ._errors import OperatorExists, UnknownOperator
from ._sql import SQLBase

__all__ = ["Operators", "OperatorsSQL"]


@runtime_checkable
class Operators(Protocol):
    """Operators and their sessions (the dashboard).  Every method blocks."""

    def add_operator(self, name: str, pwhash: str) -> None:
        """Raises :class:`OperatorExists`."""

    def operator_hash(self, name: str) -> str | None: ...

    def set_operator_hash(self, name: str, pwhash: str) -> bool: ...

    def remove_operator(self, name: str) -> bool:
        """Removes the operator and ends every session of theirs."""

    def list_operators(self) -> list[dict[str, Any]]: ...

    def create_session(self, key: str, operator: str, csrf: str, now: int, expires: int) -> None:
        """``key`` is a digest of the cookie value (the value itself is never stored)."""

    def get_session(self, key: str, now: int) -> dict[str, Any] | None:
        """``{"operator", "csrf", "expires_ms"}`` of a live session, else None."""

    def delete_session(self, key: str) -> bool: ...


class OperatorsSQL(SQLBase):
    def add_operator(self, name: str, pwhash: str) -> None:
        with self._write() as cur:
            cur.execute(
                self._q(
                    "INSERT INTO operators (name, pwhash, created_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO NOTHING"
                ),
                (name, pwhash, now_ms()),
            )
            if cur.rowcount != 1:
                raise OperatorExists(name)

    def operator_hash(self, name: str) -> str | None:
        with self._read() as cur:
            cur.execute(self._q("SELECT pwhash FROM operators WHERE name = ?"), (name,))
            row = cur.fetchone()
        return row[0] if row else None

    def set_operator_hash(self, name: str, pwhash: str) -> bool:
        with self._write() as cur:
            cur.execute(self._q("UPDATE operators SET pwhash = ? WHERE name = ?"), (pwhash, name))
            return cur.rowcount == 1

    def remove_operator(self, name: str) -> bool:
        with self._write() as cur:
            cur.execute(
                self._q(
                    "DELETE FROM sessions WHERE operator_id IN "
                    "(SELECT id FROM operators WHERE name = ?)"
                ),
                (name,),
            )
            cur.execute(self._q("DELETE FROM operators WHERE name = ?"), (name,))
            return cur.rowcount == 1

    def list_operators(self) -> list[dict[str, Any]]:
        with self._read() as cur:
            cur.execute("SELECT name, created_ms FROM operators ORDER BY name")
            return [{"name": r[0], "created_ms": r[1]} for r in cur.fetchall()]

    def create_session(self, key: str, operator: str, csrf: str, now: int, expires: int) -> None:
        with self._write() as cur:
            cur.execute(self._q("DELETE FROM sessions WHERE expires_ms < ?"), (now,))
            cur.execute(
                self._q(
                    "INSERT INTO sessions (key, operator_id, csrf, created_ms, expires_ms) "
                    "SELECT ?, id, ?, ?, ? FROM operators WHERE name = ?"
                ),
                (key, csrf, now, expires, operator),
            )
            if cur.rowcount != 1:
                raise UnknownOperator(operator)

    def get_session(self, key: str, now: int) -> dict[str, Any] | None:
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT o.name, s.csrf, s.expires_ms FROM sessions s "
                    "JOIN operators o ON o.id = s.operator_id WHERE s.key = ? AND s.expires_ms > ?"
                ),
                (key, now),
            )
            row = cur.fetchone()
        return {"operator": row[0], "csrf": row[1], "expires_ms": row[2]} if row else None

    def delete_session(self, key: str) -> bool:
        with self._write() as cur:
            cur.execute(self._q("DELETE FROM sessions WHERE key = ?"), (key,))
            return cur.rowcount == 1
