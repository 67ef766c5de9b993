"""Key wear: the encryptions made with each key, counted per transaction and persisted in
``meta`` (``uses:<key id>``).  AES-GCM with random nonces wears a key out: past
``KEY_WARN_AT`` seals the store warns, at ``KEY_REFUSE_AT`` it refuses to commit, and
rotation re-seals the rows of older keys under the active one."""

from __future__ import annotations

import logging
import sqlite3

from core._errors import StoreError
from protocol._keys import KEY_REFUSE_AT, KEY_WARN_AT, Sealer

from ._codec import aad_row
from ._metrics import key_seals

__all__ = ["KeyUses"]

log = logging.getLogger("edgepipe.store")


class KeyUses:
    """Seals rows with the active key and counts them: ``seal`` inside a transaction,
    then ``flush`` before its COMMIT (or ``abort`` to roll it back)."""

    __slots__ = ("sealer", "counts", "pending")

    def __init__(self, sealer: Sealer) -> None:
        self.sealer = sealer
        self.counts: dict[str, int] = {}
        self.pending = 0

    def load(self, con: sqlite3.Connection) -> None:
        for k, v in con.execute("SELECT k, v FROM meta WHERE k LIKE 'uses:%'"):
            self.counts[k[5:]] = v
        key_seals.set(self.counts.get(self.sealer.keyring.active_id, 0))

    def refuse_worn(self) -> None:
        """Raise StoreError when the active key has sealed too many rows; start counting."""
        kid = self.sealer.keyring.active_id
        uses = self.counts.get(kid, 0)
        if uses >= KEY_REFUSE_AT:
            raise StoreError(
                f"key {kid!r} has sealed {uses} rows; rotate it (edgepipe keys rotate)"
            )
        self.pending = 0

    def seal(self, table: str, row: int | str, plain: bytes) -> tuple[str, bytes]:
        self.pending += 1
        return self.sealer.seal(table, row, plain)

    def flush(self, con: sqlite3.Connection) -> int:
        """Add the encryptions made in this transaction to the active key's counter."""
        kid = self.sealer.keyring.active_id
        n, self.pending = self.pending, 0
        if not n:
            return self.counts.get(kid, 0)
        row = con.execute("SELECT v FROM meta WHERE k=?", (f"uses:{kid}",)).fetchone()
        uses = (row[0] if row else 0) + n
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"uses:{kid}", uses))
        self.counts[kid] = uses
        if uses >= KEY_WARN_AT and uses - n < KEY_WARN_AT:
            log.warning(
                "key %r has sealed %d rows: rotate it soon (edgepipe keys rotate)", kid, uses
            )
        return uses

    def abort(self, con: sqlite3.Connection) -> None:
        """Forget this transaction's seals and roll it back."""
        self.pending = 0
        if con.in_transaction:
            con.rollback()

    def reseal(self, con: sqlite3.Connection, table: str, pk: str, chunk: int) -> int:
        """Re-seal up to ``chunk`` rows of ``table`` not under the active key, in one
        transaction.  Returns how many (0: the table is done)."""
        sealer = self.sealer
        self.pending = 0
        try:
            con.execute("BEGIN IMMEDIATE")
            rows = con.execute(
                f"SELECT {pk}, key_id, blob FROM {table} WHERE key_id != ? LIMIT ?",
                (sealer.keyring.active_id, chunk),
            ).fetchall()
            for rid, kid, blob in rows:
                plain = sealer.open(table, aad_row(rid), kid, blob)
                kid, blob = self.seal(table, aad_row(rid), plain)
                con.execute(f"UPDATE {table} SET key_id=?, blob=? WHERE {pk}=?", (kid, blob, rid))
            self.flush(con)
            con.execute("COMMIT")
        except BaseException:
            self.abort(con)
            raise
        return len(rows)
