"""Keys and the one authenticated encryption of edgepipe (the edge store and the receiver).

A *keyring* is a small text file (or environment variable, or Kubernetes Secret) with one
key per line, ``<key id> <base64url of 32 random bytes>``; the last line is the active key
(new writes), older lines keep old rows readable.  Every row stores the id of the key that
encrypted it.

Rows are sealed with AES-256-GCM under a random 96-bit nonce.  The associated data binds
each ciphertext to its place (device id, table, row key, key id, schema version), so a row
copied to another place, another table or another device fails authentication.  The
number of encryptions per key is counted in the store; NIST SP 800-38D allows 2**32
random-nonce encryptions per key, edgepipe warns at 2**28 and refuses new writes at 2**30,
long before the limit (``edgepipe keys rotate`` then makes a fresh active key).

:class:`Aead` is that scheme on its own (nonce || ciphertext, associated data and key checks
chosen by the caller); :class:`Sealer` binds it to the store's row places, and the cloud
receiver seals device secrets with it under its master key (``cloud._secrets``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from core._errors import KeyError_, TamperedError
from core._fsutil import atomic_write

__all__ = [
    "KEY_REFUSE_AT",
    "KEY_WARN_AT",
    "AadFor",
    "Aead",
    "Keyring",
    "key_check",
    "key_check_ok",
    "Sealer",
    "Unauthentic",
    "append_key_line",
    "b64d",
    "b64e",
    "generate_key_line",
    "read_key_file",
    "write_new_key_file",
]

#: Version of the associated-data layout (not the SQL schema version): it is bound into
#: every ciphertext, so it only changes if the row format itself changes.
ROW_FORMAT = 1
KEY_WARN_AT = 2**28
KEY_REFUSE_AT = 2**30


def b64d(s: str) -> bytes:
    """Unpadded base64url (the key-line format) to bytes; ``ValueError`` if it is not."""
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def generate_key_line(key_id: str | None = None) -> str:
    key = secrets.token_bytes(32)
    kid = key_id or "k" + secrets.token_hex(4)
    return f"{kid} {b64e(key)}"


class Keyring:
    """Store keys by id; ``active`` encrypts new rows.  Never printable."""

    __slots__ = ("_keys", "active_id", "source")

    def __init__(self, keys: dict[str, bytes], active_id: str, source: str = "keyring") -> None:
        if active_id not in keys:
            raise KeyError_(f"active key {active_id!r} is not in the keyring")
        self._keys = dict(keys)
        self.active_id = active_id
        self.source = source

    def __repr__(self) -> str:
        return f"<Keyring {len(self._keys)} key(s), active {self.active_id!r} from {self.source}>"

    @property
    def ids(self) -> list[str]:
        return list(self._keys)

    def key(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise KeyError_(
                f"no key with id {key_id!r} in the keyring from {self.source}; rows written "
                "with it cannot be read until that key is added back"
            ) from None

    def derive(self, purpose: str) -> bytes:
        """A sub-key for ``purpose`` from the active key (e.g. message identities)."""
        return hashlib.blake2b(
            purpose.encode(), key=self._keys[self.active_id], digest_size=32
        ).digest()

    @classmethod
    def parse(cls, text: str, source: str) -> Keyring:
        keys: dict[str, bytes] = {}
        active = None
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) == 1:  # a bare key: its id is derived from it
                material = parts[0]
                try:
                    key = b64d(material)
                except ValueError:
                    raise KeyError_(f"{source}: line {n}: not a base64 key") from None
                kid = "k" + hashlib.sha256(key).hexdigest()[:8]
            elif len(parts) == 2:
                kid, material = parts
                try:
                    key = b64d(material)
                except ValueError:
                    raise KeyError_(f"{source}: line {n}: not a base64 key") from None
            else:
                raise KeyError_(f"{source}: line {n}: expected '<key id> <base64 key>'")
            if len(key) != 32:
                raise KeyError_(f"{source}: line {n}: a key must be 32 bytes, not {len(key)}")
            if kid in keys and keys[kid] != key:
                raise KeyError_(f"{source}: line {n}: key id {kid!r} appears twice")
            keys[kid] = key
            active = kid
        if active is None:
            raise KeyError_(f"{source}: no key found")
        return cls(keys, active, source)

    @classmethod
    def from_file(cls, path: str | Path) -> Keyring:
        return cls.parse(read_key_file(path, "store key", KeyError_), str(path))

    @classmethod
    def from_secret(cls, secret: object) -> Keyring:
        """From a config :class:`~config._models.Secret` (file, env or inline)."""
        file = getattr(secret, "file", None)
        if file is not None:
            return cls.from_file(file)
        env = getattr(secret, "env", None)
        if env is not None:
            text = os.environ.get(env)
            if not text:
                raise KeyError_(f"environment variable {env} (the store key) is not set")
            return cls.parse(text, f"${env}")
        return cls.parse(secret.get(), "inline config")  # type: ignore[attr-defined]


#: The associated data of a ciphertext, given the id of the key that seals it (every layout
#: binds the key id, so a blob relabelled with another key id fails authentication).
AadFor = Callable[[str], bytes]


class Unauthentic(Exception):
    """A blob failed authentication: modified, truncated, or sealed for another place.
    Callers turn it into their own error (the store's :class:`TamperedError`, the
    receiver's ``SecretUnreadable``); it never carries key material."""

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"ciphertext failed authentication with key {key_id!r}")


def key_check(key: bytes, purpose: bytes) -> bytes:
    """The one key check of edgepipe: a keyed BLAKE2b-512 of a constant, personalised by
    ``purpose`` (at most 16 bytes: the edge store uses ``b"edgepipe-kcv"``, the receiver's
    master key ``b"edgepipe-cloudkc"``).  It proves that a key is the one some data was
    sealed with without sealing anything (no nonce to reuse, nothing to decrypt), and says
    nothing about the key (a MAC of public text)."""
    return hashlib.blake2b(b"edgepipe key check", key=key, person=purpose).digest()


def key_check_ok(key: bytes, purpose: bytes, value: bytes) -> bool:
    return hmac.compare_digest(value, key_check(key, purpose))


class Aead:
    """The one AEAD of edgepipe: AES-256-GCM under the keys of a :class:`Keyring`.

    A sealed blob is ``nonce (12 random bytes) || ciphertext || tag (16 bytes)``; the
    associated data is the caller's (``aad(key_id)``).  The edge store's rows
    (:class:`Sealer`) and the receiver's device secrets are both sealed with it.

    Which key some data was sealed with is proved by :func:`key_check` (one scheme for the
    edge store and the receiver), before anything is read or written.
    """

    __slots__ = ("_ciphers", "keyring")

    def __init__(self, keyring: Keyring) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.keyring = keyring
        self._ciphers = {kid: AESGCM(keyring.key(kid)) for kid in keyring.ids}

    def __repr__(self) -> str:
        return f"<Aead over {self.keyring!r}>"

    @property
    def ids(self) -> list[str]:
        return list(self._ciphers)

    def has(self, key_id: str) -> bool:
        return key_id in self._ciphers

    def seal(
        self, aad: AadFor, plaintext: bytes, *, key_id: str | None = None
    ) -> tuple[str, bytes]:
        """-> (key id, nonce || ciphertext) under the active key (or ``key_id``)."""
        kid = key_id or self.keyring.active_id
        nonce = os.urandom(12)
        return kid, nonce + self._ciphers[kid].encrypt(nonce, plaintext, aad(kid))

    def open(self, key_id: str, aad: AadFor, blob: bytes) -> bytes:
        """The plaintext of ``blob``; :class:`KeyError_` for a key id the keyring lacks,
        :class:`Unauthentic` when the blob fails authentication."""
        from cryptography.exceptions import InvalidTag

        cipher = self._ciphers.get(key_id)
        if cipher is None:
            self.keyring.key(key_id)  # raises the explanatory KeyError_
        try:
            return cipher.decrypt(blob[:12], blob[12:], aad(key_id))  # type: ignore[union-attr]
        except (InvalidTag, ValueError):
            raise Unauthentic(key_id) from None

    def opens(self, key_id: str, aad: AadFor, blob: bytes) -> bytes | None:
        """The plaintext of ``blob``, or None when it does not authenticate under ``key_id``
        or the keyring lacks that key (for reading old key checks; never raises)."""
        if key_id not in self._ciphers:
            return None
        try:
            return self.open(key_id, aad, blob)
        except Unauthentic:
            return None


class Sealer:
    """Seal/open the edge store's rows: :class:`Aead` with place-binding associated data
    (device id, table, row key, key id, row format)."""

    def __init__(self, keyring: Keyring, device_id: str) -> None:
        self.keyring = keyring
        self.device = device_id.encode()
        self.aead = Aead(keyring)

    def _aad(self, table: str, row: int | str, key_id: str) -> bytes:
        return b"edgepipe|%s|%s|%s|%s|v%d" % (
            self.device,
            table.encode(),
            str(row).encode(),
            key_id.encode(),
            ROW_FORMAT,
        )

    def _place(self, table: str, row: int | str) -> AadFor:
        return lambda kid: self._aad(table, row, kid)

    def opens(self, table: str, row: int | str, key_id: str, blob: bytes) -> bool:
        """Whether ``blob`` authenticates as sealed at this place under ``key_id`` (a key
        check; False for a wrong key or a key id the keyring lacks, never an error)."""
        if not self.aead.has(key_id):
            return False
        try:
            self.aead.open(key_id, self._place(table, row), blob)
            return True
        except Unauthentic:
            return False

    def seal(self, table: str, row: int | str, plaintext: bytes) -> tuple[str, bytes]:
        """-> (key id, nonce || ciphertext)."""
        return self.aead.seal(self._place(table, row), plaintext)

    def open(self, table: str, row: int | str, key_id: str, blob: bytes) -> bytes:
        try:
            return self.aead.open(key_id, self._place(table, row), blob)
        except Unauthentic:
            raise TamperedError(
                f"{table} row {row} failed authentication (modified, moved, or not written "
                f"by this device with key {key_id!r})",
                table=table,
                seq=row if isinstance(row, int) else None,
            ) from None


def read_key_file(path: str | Path, what: str, error: type[Exception]) -> str:
    """The text of a key file, refused (``error``) when others can read it: group or others
    for a plain file; others for a Kubernetes Secret mount, whose mode comes from the pod
    spec and which is 0440 root:<pod group> with fsGroup."""
    path = Path(path)
    try:
        st = path.stat()  # follows symlinks: Kubernetes Secret mounts are links
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror}") from None
    secret_mount = path.is_symlink() and (path.parent / "..data").is_symlink()
    forbidden = stat.S_IRWXO | (stat.S_IWGRP | stat.S_IXGRP if secret_mount else stat.S_IRWXG)
    if st.st_mode & forbidden:
        fix = f"run: chmod 600 {path}"
        if secret_mount:
            fix = "set defaultMode: 0400 on the Secret volume (0440 with fsGroup is fine)"
        raise error(
            f"{what} file {path} is readable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); {fix}"
        )
    try:
        return path.read_text()
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror}") from None


def write_new_key_file(path: str | Path, text: str) -> None:
    """Create ``path`` with mode 0600 and ``text``, fsynced; never replaces an existing file
    (``FileExistsError``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def append_key_line(path: str | Path, line: str) -> None:
    """Add ``line`` as the new last (active) line of a key file: a new 0600 file renamed over
    the old one and the directory fsynced, so a crash leaves the old or the new file, never
    half of one.  Raises ``OSError`` (nothing changed) when it cannot."""
    path = Path(path)
    text = path.read_text()
    if text and not text.endswith("\n"):
        text += "\n"
    atomic_write(path, (text + line + "\n").encode())
