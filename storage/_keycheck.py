"""Which keys and which device a store belongs to: a key check value per key id and a MAC
of the device id per key, kept in ``meta`` (``kcv:<id>``, ``dev:<id>``).

A wrong key or another device's keyring is a clear error before anything is written, not
"tampered data" later.  Schema 1's check values were fixed-nonce encryptions, still read
through :meth:`~protocol._keys.Sealer.opens`."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from core._errors import KeyError_, StoreError
from protocol._keys import Sealer, key_check, key_check_ok

from ._codec import SEALED

__all__ = ["check_device", "check_keys", "device_mac", "has_new_keys", "kcv"]


_PURPOSE = b"edgepipe-kcv"


def kcv(sealer: Sealer, kid: str) -> bytes:
    """A key check value (:func:`protocol._keys.key_check`), independent of the device."""
    return key_check(sealer.keyring.key(kid), _PURPOSE)


def _kcv_ok(sealer: Sealer, kid: str, value: bytes, version: int) -> bool:
    if version >= 2:
        return key_check_ok(sealer.keyring.key(kid), _PURPOSE, value)
    # schema 1: an AES-GCM encryption of a constant under a fixed all-zero nonce
    return sealer.opens("meta", "kcv", kid, b"\0" * 12 + value)


def device_mac(sealer: Sealer, kid: str) -> bytes:
    """The device id is not stored in clear: a MAC of it under each key."""
    return hashlib.blake2b(
        sealer.device, key=sealer.keyring.key(kid), person=b"edgepipe-device"
    ).digest()


def check_device(con: sqlite3.Connection, sealer: Sealer, path: Path) -> None:
    """Refuse a store written by another device."""
    device = sealer.device.decode()
    row = con.execute("SELECT v FROM meta WHERE k='device'").fetchone()  # schema 1
    if row is not None and row[0] != device:
        raise StoreError(f"{path} belongs to device {row[0]!r}, not {device!r}; refusing to mix")
    for kid in sealer.keyring.ids:
        row = con.execute("SELECT v FROM meta WHERE k=?", (f"dev:{kid}",)).fetchone()
        if row is not None and row[0] != device_mac(sealer, kid):
            raise StoreError(f"{path} belongs to another device, not {device!r}; refusing to mix")


def has_new_keys(con: sqlite3.Connection, sealer: Sealer) -> bool:
    """Whether the keyring holds a key id without a check value yet."""
    have = {r[0] for r in con.execute("SELECT k FROM meta WHERE k LIKE 'kcv:%'")}
    return any(f"kcv:{k}" not in have for k in sealer.keyring.ids)


def check_keys(con: sqlite3.Connection, sealer: Sealer, version: int) -> None:
    """A check value per key id: a wrong key is a clear error, not 'tampered data'.
    Raises before anything is written, so a wrong keyring never changes the file.  Inside
    a transaction, records the check values (and device MACs) of new key ids."""
    new = []
    for kid in sealer.keyring.ids:
        row = con.execute("SELECT v FROM meta WHERE k=?", (f"kcv:{kid}",)).fetchone()
        if row is None:
            new.append(kid)
            continue
        if not _kcv_ok(sealer, kid, row[0], version):
            raise KeyError_(
                f"the key with id {kid!r} from {sealer.keyring.source} is not the key this "
                f"store was written with; nothing was changed"
            ) from None
    used: set[str] = set()
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for table, _pk in SEALED:
        if table in tables:
            used |= {r[0] for r in con.execute(f"SELECT DISTINCT key_id FROM {table}")}
    missing = used - set(sealer.keyring.ids)
    if missing:
        raise KeyError_(
            f"the store has rows written with key id(s) {sorted(missing)} that are not in "
            f"the keyring from {sealer.keyring.source}; nothing was changed"
        )
    if new and con.in_transaction:
        for kid in new:
            con.execute("INSERT INTO meta VALUES (?, ?)", (f"kcv:{kid}", kcv(sealer, kid)))
            con.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"dev:{kid}", device_mac(sealer, kid))
            )
