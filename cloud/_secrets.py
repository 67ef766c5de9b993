"""Device secrets at rest: sealed with the receiver's master key.

The receiver must keep each device's HMAC secret (it verifies signatures with it), so a copy
of its database would otherwise let anyone sign uploads as any device.  Every secret is
stored sealed with AES-256-GCM under a *master key* that lives outside the database: a 0600
file (``EDGEPIPE_CLOUD_MASTER_KEY_FILE``, ``--master-key-file``) or an environment variable
(``EDGEPIPE_CLOUD_MASTER_KEY``).

The master key uses the edge store's key-line format (:func:`protocol._keys.generate_key_line`):
one ``<key id> <base64url of 32 random bytes>`` per line, the last line is the active key
(new and re-wrapped secrets), older lines keep secrets sealed with them readable until
``edgepipe-cloud master-key rotate`` has re-wrapped them.

Sealing is the edge's AEAD (:class:`protocol._keys.Aead`, AES-256-GCM); each row stores
``(key id, base64url(nonce || ciphertext))``.  The associated data binds the
ciphertext to the device name and the key id, so a row copied to another device, or relabelled
with another key id, fails authentication.  For every key id the database also keeps a *key
check* (:func:`protocol._keys.key_check`, the scheme the edge store uses too), so a wrong
master key is refused when the receiver starts, before it writes anything, even in a
database without devices.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from core._errors import KeyError_
from protocol._keys import (
    Aead,
    Keyring,
    Unauthentic,
    b64d,
    b64e,
    generate_key_line,
    key_check,
    key_check_ok,
    read_key_file,
    write_new_key_file,
)

from ._errors import MasterKeyError, SecretUnreadable

__all__ = [
    "MasterKey",
    "MasterKeyError",
    "SecretUnreadable",
    "generate_master_key_line",
    "write_new_key_file",
]

#: Layout of the associated data; bound into every ciphertext.
SECRET_FORMAT = 1
_CHECK_TEXT = b"edgepipe-cloud master key check"  # schema 2's sealed key checks
_CHECK_PURPOSE = b"edgepipe-cloudkc"
_CHECK_BYTES = 64
#: A file-backed master key is re-read at most this often when a row names an unknown key
#: id (another process rotated to a key added to the file after this one started).
_RELOAD_EVERY_S = 2.0


def no_master_key() -> MasterKeyError:
    return MasterKeyError(
        "no master key configured: device secrets are stored sealed with it; set "
        "EDGEPIPE_CLOUD_MASTER_KEY_FILE or --master-key-file (a 0600 file), or "
        "EDGEPIPE_CLOUD_MASTER_KEY; 'edgepipe-cloud master-key generate --out FILE' makes one"
    )


def generate_master_key_line(key_id: str | None = None) -> str:
    """A new random key line (the edge store's format, ``<key id> <base64url key>``)."""
    return generate_key_line(key_id)


def _secret_aad(device: str) -> Callable[[str], bytes]:
    d = device.encode()

    def aad(key_id: str) -> bytes:
        k = key_id.encode()
        return b"edgepipe-cloud/device-secret/v%d|%d:%s|%d:%s" % (
            SECRET_FORMAT,
            len(d),
            d,
            len(k),
            k,
        )

    return aad


def _check_aad(key_id: str) -> bytes:
    k = key_id.encode()
    return b"edgepipe-cloud/key-check/v%d|%d:%s" % (SECRET_FORMAT, len(k), k)


class MasterKey:
    """The receiver's master keyring.  Never printable; ``source`` says where it came from."""

    def __init__(self, keys: dict[str, bytes], active_id: str, source: str) -> None:
        self.source = source
        self._path: Path | None = None
        self._lock = threading.Lock()
        self._next_reload = 0.0
        try:
            ring = Keyring(keys, active_id, source)
        except KeyError_:
            raise MasterKeyError(f"active key {active_id!r} is not in the master key") from None
        self._install(ring)

    def _install(self, ring: Keyring) -> None:
        # One attribute assignment: readers in other threads see the old or the new set, whole.
        self._aead = Aead(ring)

    @property
    def active_id(self) -> str:
        return self._aead.keyring.active_id

    def __repr__(self) -> str:
        return f"<MasterKey {len(self.ids)} key(s), active {self.active_id!r} from {self.source}>"

    @property
    def ids(self) -> list[str]:
        return self._aead.ids

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, source: str) -> MasterKey:
        try:
            ring = Keyring.parse(text, source)
        except KeyError_ as exc:
            raise MasterKeyError(f"master key: {exc}") from None
        return cls({kid: ring.key(kid) for kid in ring.ids}, ring.active_id, source)

    @classmethod
    def from_file(cls, path: str | Path) -> MasterKey:
        path = Path(path)
        key = cls.parse(read_key_file(path, "master key", MasterKeyError), str(path))
        key._path = path
        return key

    @classmethod
    def from_settings(cls, settings: object) -> MasterKey | None:
        """From :class:`cloud.Settings` (``master_key_file`` or ``master_key``), or None."""
        file = getattr(settings, "master_key_file", None)
        if file:
            return cls.from_file(file)
        inline = getattr(settings, "master_key", None)
        if inline is not None:
            return cls.parse(inline.get_secret_value(), "$EDGEPIPE_CLOUD_MASTER_KEY")
        return None

    @property
    def path(self) -> Path | None:
        return self._path

    def _reload(self) -> bool:
        """Re-read the key file (rate-limited); True if it now has more keys."""
        if self._path is None:
            return False
        with self._lock:
            now = time.monotonic()
            if now < self._next_reload:
                return False
            self._next_reload = now + _RELOAD_EVERY_S
            try:
                fresh = MasterKey.from_file(self._path)
            except MasterKeyError:
                return False
            if set(fresh.ids) <= set(self.ids):
                return False
            # Keys this process already has stay usable even if their lines were removed;
            # the file decides which key seals new secrets.
            old, new = self._aead.keyring, fresh._aead.keyring
            keys = {kid: new.key(kid) for kid in new.ids}
            keys.update({kid: old.key(kid) for kid in old.ids})
            self._install(Keyring(keys, new.active_id, self.source))
            return True

    # -- sealing ---------------------------------------------------------------------------
    def seal(self, device: str, secret: bytes) -> tuple[str, str]:
        """-> (key id, base64url(nonce || ciphertext)) for the ``devices`` row of ``device``."""
        kid, blob = self._aead.seal(_secret_aad(device), secret)
        return kid, b64e(blob)

    def open(self, device: str, key_id: str, sealed: str) -> bytes:
        aead = self._aead
        if not aead.has(key_id) and self._reload():
            aead = self._aead
        if not aead.has(key_id):
            raise MasterKeyError(
                f"the secret of device {device!r} is sealed with master key {key_id!r}, which "
                f"the master key from {self.source} does not have (wrong key, or its line was "
                "removed before 'edgepipe-cloud master-key rotate' finished)"
            )
        try:
            return aead.open(key_id, _secret_aad(device), b64d(sealed))
        except (Unauthentic, ValueError):
            raise SecretUnreadable(
                device,
                key_id,
                f"it fails authentication with master key {key_id!r} (modified, or copied "
                "from another device's row); remove the device and add it again",
            ) from None

    def check_value(self, key_id: str | None = None) -> tuple[str, str]:
        """-> (key id, key check) for the active key or ``key_id``: the edge's one key-check
        scheme (:func:`protocol._keys.key_check`)."""
        kid = key_id or self.active_id
        return kid, b64e(key_check(self._aead.keyring.key(kid), _CHECK_PURPOSE))

    def verify_check(self, key_id: str, value: str) -> bool:
        """Whether ``value`` is the key check of ``key_id``.  Databases written before the
        key-check scheme was shared hold a sealed text instead (schema 2's format, longer
        than a check); it is still accepted, and :meth:`is_current_check` tells the backend
        to rewrite it."""
        if key_id not in self.ids:
            return False
        try:
            blob = b64d(value)
        except ValueError:
            return False
        if self.is_current_check(value):
            return key_check_ok(self._aead.keyring.key(key_id), _CHECK_PURPOSE, blob)
        return self._aead.opens(key_id, _check_aad, blob) == _CHECK_TEXT

    @staticmethod
    def is_current_check(value: str) -> bool:
        try:
            return len(b64d(value)) == _CHECK_BYTES
        except ValueError:
            return False
