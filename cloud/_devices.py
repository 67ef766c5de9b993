"""The devices role: registered devices, their sealed secrets and the master key.

Device secrets are stored sealed with the receiver's :class:`~cloud._secrets.MasterKey`;
without one every other role works and device secrets are refused (:class:`MasterKeyError`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from core._clock import now_ms, utc_day

from ._errors import CloudError, DeviceExists, MasterKeyError, SecretUnreadable
from ._secrets import MasterKey, no_master_key
from ._sql import SQLBase

__all__ = ["Devices", "DevicesSQL"]

log = logging.getLogger("edgepipe.cloud")

_HEX_SECRET = re.compile(r"[0-9a-f]{64}")


@runtime_checkable
class Devices(Protocol):
    """Registered devices (with their sync status) and their secrets.  None returns secrets
    except :meth:`get_device_secret`."""

    master_key: MasterKey | None

    def add_device(self, name: str, secret: bytes) -> None:
        """Raises :class:`DeviceExists`, or :class:`MasterKeyError` without a master key."""

    def remove_device(self, name: str) -> bool: ...

    def get_device_secret(self, name: str) -> bytes | None:
        """None for an unknown device; :class:`SecretUnreadable` if the stored secret fails
        authentication, :class:`MasterKeyError` if its key is missing."""

    def rewrap_secrets(self, batch: int = 200) -> int:
        """Re-seal every device secret not sealed with the active master key (one short
        transaction per ``batch`` rows; the others stay readable meanwhile), then forget
        the key checks of keys no row uses.  Returns the number re-sealed."""

    def list_devices(self) -> list[dict[str, Any]]: ...

    def get_device(self, name: str) -> dict[str, Any] | None: ...


class DevicesSQL(SQLBase):
    #: Seals device secrets; None: every other method works, device secrets are refused.
    master_key: MasterKey | None = None
    #: Per device name: (key id, sealed, secret).  A hit needs the row to be unchanged, so
    #: a device removed and added again (by another process too) is never served stale.
    _secret_cache: dict[str, tuple[str, str, bytes]]

    # -- the master key ------------------------------------------------------------------
    def _require_master_key(self) -> MasterKey:
        if self.master_key is None:
            raise no_master_key()
        return self.master_key

    def _adopt_master_key(self, cur: Any, mk: MasterKey) -> None:
        """Check ``mk`` against the database, then seal plaintext secrets (same transaction:
        a refused key writes nothing)."""
        q = self._q
        cur.execute("SELECT key_id, key_check FROM master_keys")
        checks = dict(cur.fetchall())
        cur.execute("SELECT DISTINCT secret_key_id FROM devices WHERE secret_key_id IS NOT NULL")
        used = {r[0] for r in cur.fetchall()}
        missing = sorted((used | set(checks)) - set(mk.ids))
        if missing:
            raise MasterKeyError(
                f"this database's device secrets are sealed with master key id(s) "
                f"{', '.join(missing)}, which the master key from {mk.source} (ids "
                f"{', '.join(mk.ids)}) does not have: wrong master key, or an old key line was "
                "removed before 'edgepipe-cloud master-key rotate' finished"
            )
        for kid, check in checks.items():
            if not mk.verify_check(kid, check):
                raise MasterKeyError(
                    f"master key {kid!r} from {mk.source} is not the key this database was "
                    "sealed with (its key check fails): wrong master key"
                )
        for kid, check in checks.items():  # an older check format: rewritten once, verified
            if not mk.is_current_check(check):
                cur.execute(
                    q("UPDATE master_keys SET key_check = ? WHERE key_id = ?"),
                    (mk.check_value(kid)[1], kid),
                )
        for kid in sorted(used - set(checks)):  # no key check (yet): try one of its rows
            cur.execute(
                q("SELECT name, secret FROM devices WHERE secret_key_id = ? LIMIT 1"), (kid,)
            )
            name, sealed = cur.fetchone()
            try:
                mk.open(name, kid, sealed)
            except SecretUnreadable:
                raise MasterKeyError(
                    f"master key {kid!r} from {mk.source} does not open the device secrets "
                    "sealed with that key id: wrong master key"
                ) from None
            cur.execute(
                q("INSERT INTO master_keys (key_id, key_check, created_ms) VALUES (?, ?, ?)"),
                (*mk.check_value(kid), now_ms()),
            )
        if mk.active_id not in checks and mk.active_id not in used:
            cur.execute(
                q(
                    "INSERT INTO master_keys (key_id, key_check, created_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (key_id) DO NOTHING"
                ),
                (*mk.check_value(), now_ms()),
            )
        cur.execute("SELECT id, name, secret FROM devices WHERE secret_key_id IS NULL")
        plain = cur.fetchall()
        for did, name, text in plain:
            if not _HEX_SECRET.fullmatch(text):
                raise CloudError(f"device {name!r}: stored secret is neither sealed nor hex")
            kid, sealed = mk.seal(name, bytes.fromhex(text))
            cur.execute(
                q(
                    "UPDATE devices SET secret = ?, secret_key_id = ? "
                    "WHERE id = ? AND secret_key_id IS NULL"
                ),
                (sealed, kid, did),
            )
        if plain:
            log.warning(
                "sealed %d plaintext device secret(s) with master key %r", len(plain), mk.active_id
            )

    def rewrap_secrets(self, batch: int = 200) -> int:
        mk = self._require_master_key()
        q = self._q
        done = 0
        while True:
            with self._write() as cur:
                active = mk.active_id
                cur.execute(
                    q(
                        "INSERT INTO master_keys (key_id, key_check, created_ms) VALUES (?, ?, ?) "
                        "ON CONFLICT (key_id) DO NOTHING"
                    ),
                    (*mk.check_value(active), now_ms()),
                )
                cur.execute(
                    q(
                        "SELECT id, name, secret, secret_key_id FROM devices WHERE "
                        "secret_key_id IS NOT NULL AND secret_key_id <> ? ORDER BY id LIMIT ?"
                    ),
                    (active, batch),
                )
                rows = cur.fetchall()
                for did, name, sealed, kid in rows:
                    secret = mk.open(name, kid, sealed)
                    new_kid, resealed = mk.seal(name, secret)
                    cur.execute(
                        q("UPDATE devices SET secret = ?, secret_key_id = ? WHERE id = ?"),
                        (resealed, new_kid, did),
                    )
                done += len(rows)
                if not rows:
                    cur.execute(
                        q(
                            "DELETE FROM master_keys WHERE key_id <> ? AND key_id NOT IN "
                            "(SELECT secret_key_id FROM devices WHERE secret_key_id IS NOT NULL)"
                        ),
                        (active,),
                    )
                    return done

    # -- devices -------------------------------------------------------------------------
    def add_device(self, name: str, secret: bytes) -> None:
        kid, sealed = self._require_master_key().seal(name, secret)
        with self._write() as cur:
            cur.execute(
                self._q(
                    "INSERT INTO devices (name, secret, secret_key_id, created_ms) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING"
                ),
                (name, sealed, kid, now_ms()),
            )
            if cur.rowcount != 1:
                raise DeviceExists(name)

    def remove_device(self, name: str) -> bool:
        with self._write() as cur:
            cur.execute(self._q("SELECT id FROM devices WHERE name = ?"), (name,))
            row = cur.fetchone()
            if row is None:
                return False
            did = row[0]
            # Explicit, child tables first (SQLite only cascades with foreign_keys=ON).
            cur.execute(
                self._q(
                    "DELETE FROM readings WHERE series_id IN "
                    "(SELECT id FROM series WHERE device_id = ?)"
                ),
                (did,),
            )
            cur.execute(
                self._q(
                    "DELETE FROM readings_hourly WHERE series_id IN "
                    "(SELECT id FROM series WHERE device_id = ?)"
                ),
                (did,),
            )
            for table in ("series", "batches", "nonces", "dead_letters", "device_daily"):
                cur.execute(self._q(f"DELETE FROM {table} WHERE device_id = ?"), (did,))
            cur.execute(self._q("DELETE FROM devices WHERE id = ?"), (did,))
        self._cache().pop(name, None)
        return True

    def _cache(self) -> dict[str, tuple[str, str, bytes]]:
        try:
            return self._secret_cache
        except AttributeError:
            self._secret_cache = {}
            return self._secret_cache

    def get_device_secret(self, name: str) -> bytes | None:
        mk = self._require_master_key()
        with self._read() as cur:
            cur.execute(
                self._q("SELECT secret_key_id, secret FROM devices WHERE name = ?"), (name,)
            )
            row = cur.fetchone()
        if row is None:
            return None
        kid, sealed = row
        if kid is None:  # only a process without the master key can have written it
            raise SecretUnreadable(
                name, None, "it is stored in plaintext; restart the receiver to seal it"
            )
        cache = self._cache()
        hit = cache.get(name)
        if hit is not None and hit[0] == kid and hit[1] == sealed:
            return hit[2]
        secret = mk.open(name, kid, sealed)
        if len(cache) >= 100_000:
            cache.clear()
        cache[name] = (kid, sealed, secret)
        return secret

    _DEVICE_COLS = (
        "d.name, d.created_ms, d.last_seen_ms, d.last_sync_ms, d.last_link, d.last_seq, "
        "d.status, d.last_error, d.last_error_ms, dd.readings, dd.bytes, dd.uploads"
    )

    def _device_sql(self, where: str) -> str:
        return self._q(
            f"SELECT {self._DEVICE_COLS} FROM devices d "
            "LEFT JOIN device_daily dd ON dd.device_id = d.id AND dd.day = ? "
            f"{where} ORDER BY d.name"
        )

    @staticmethod
    def _device_row(r: Sequence[Any]) -> dict[str, Any]:
        return {
            "name": r[0],
            "created_ms": r[1],
            "last_seen_ms": r[2],
            "last_sync_ms": r[3],
            "link": r[4],
            "last_seq": r[5],
            "reported": json.loads(r[6]) if r[6] else None,
            "last_error": r[7],
            "last_error_ms": r[8],
            "today": {"readings": r[9] or 0, "bytes": r[10] or 0, "uploads": r[11] or 0},
        }

    def list_devices(self) -> list[dict[str, Any]]:
        with self._read() as cur:
            cur.execute(self._device_sql(""), (utc_day(now_ms()),))
            return [self._device_row(r) for r in cur.fetchall()]

    def get_device(self, name: str) -> dict[str, Any] | None:
        with self._read() as cur:
            cur.execute(self._device_sql("WHERE d.name = ?"), (utc_day(now_ms()), name))
            row = cur.fetchone()
        return self._device_row(row) if row else None
