"""Signed chain bundles: what the cloud signs and a device verifies (docs/rollout.md).

A *bundle* is a filter chain as the operator wrote it (the filters YAML, verbatim) plus
every module it names, content-addressed by sha256.  Its *manifest* says which, and is
signed with the fleet's Ed25519 signing key::

    {"format": 1, "fleet": "acme", "version": 7, "priority": "normal",
     "not_before": <ms>, "not_after": <ms>, "created": <ms>, "key_id": "ed...",
     "filters": {"sha256": "<hex>", "text": "version: 1\\nchain: ..."},
     "modules": [{"path": "lib/validity.wasm", "sha256": "<hex>", "size": 1234}, ...]}

A *local bundle* carries no chain: in place of ``filters`` and ``modules`` its manifest has
``"chain": "local"``, which tells the device to go back to the chain its own configuration
names (``chain_file``; a rollback for a device that ran no bundle before).  It is signed,
bounded and verified like any other, and like any other it is refused at or below the
highest version applied.

The manifest travels as its *canonical bytes*: compact JSON, keys sorted, ASCII only,
integers only (no floats).  A device verifies the signature over exactly those bytes, then
parses them, and refuses bytes that are not the canonical encoding of what they parse to
(no second reading of the same signature).  The signature is Ed25519 over
``b"edgepipe-bundle-v1\\n" + manifest`` (the prefix keeps a bundle signature from meaning
anything else).  A key id is derived from the public key (:func:`key_id`), so the device
looks up the key a bundle names and nobody can name another key's id.

:func:`verify` is every check a device makes before downloading a module, in this order,
each refusal a :class:`BundleRefused` with a reason code: ``too_large`` (the manifest),
``unknown_key``/``retired_key`` (the key id the envelope names), ``bad_signature``,
``malformed`` (not canonical, fields, paths, counts, sizes), ``not_yet_valid``/``expired``
(the validity window against the device's clock), ``downgrade`` (a version not above the
highest the device has applied).  :func:`check_module` then checks each module's bytes
(``hash_mismatch``, ``too_large``).

This module imports only the standard library at import time; ``cryptography`` (already
the edge's AEAD) is imported when a key is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from core._errors import EdgepipeError

__all__ = [
    "DEVICE_REASONS",
    "FORMAT",
    "MAX_FILTERS_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_MODULES",
    "MAX_MODULE_BYTES",
    "MAX_TOTAL_BYTES",
    "PRIORITIES",
    "REASONS",
    "CHAIN_LOCAL",
    "BundleRefused",
    "Manifest",
    "ModuleEntry",
    "PublicKey",
    "SigningKey",
    "check_module",
    "check_path",
    "decode_manifest",
    "encode_manifest",
    "envelope",
    "key_id",
    "open_envelope",
    "parse_public_keys",
    "verify",
]

FORMAT = 1
#: The ``chain`` of a local bundle's manifest (the only value that field takes).
CHAIN_LOCAL = "local"
PRIORITIES = ("normal", "urgent")
#: Every reason a bundle is refused for (what the device reports to the cloud).
REASONS = (
    "bad_signature",
    "unknown_key",
    "retired_key",
    "expired",
    "not_yet_valid",
    "downgrade",
    "hash_mismatch",
    "too_large",
    "malformed",
)
#: Every reason a device reports for not running a bundle: the bundle's own (above) and
#: its checks of the chain and the install.
DEVICE_REASONS = (
    *REASONS,
    "invalid_chain",
    "chain_source_local",
    "download_failed",
    "install_failed",
)
MAX_MANIFEST_BYTES = 256 * 1024
MAX_FILTERS_BYTES = 64 * 1024
MAX_MODULES = 32
#: The largest module the edge loads at all (``limits.module_max_kb`` is at most 16 MiB).
MAX_MODULE_BYTES = 16 * 1024 * 1024
MAX_TOTAL_BYTES = 64 * 1024 * 1024
MAX_PATH = 255
MAX_FLEET = 64
_SIG_CONTEXT = b"edgepipe-bundle-v1\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_FLEET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KID = re.compile(r"ed[0-9a-f]{16}")
_KEYS = {
    "format",
    "fleet",
    "version",
    "priority",
    "not_before",
    "not_after",
    "created",
    "key_id",
    "filters",
    "modules",
}
#: A local bundle's fields: ``chain`` in place of ``filters`` and ``modules``.
_LOCAL_KEYS = (_KEYS - {"filters", "modules"}) | {"chain"}
_MAX_INT = 2**53  # what every JSON reader keeps exactly


class BundleRefused(EdgepipeError):
    """A bundle a device will not apply: ``reason`` is one of :data:`REASONS`, ``detail``
    says what exactly (never key material), ``version`` the bundle's when it is known."""

    def __init__(self, reason: str, detail: str, *, version: int | None = None) -> None:
        assert reason in REASONS, reason
        self.reason, self.detail, self.version = reason, detail, version
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class ModuleEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    fleet: str
    version: int
    priority: str
    not_before: int
    not_after: int
    created: int
    key_id: str
    filters_text: str
    filters_sha256: str
    modules: tuple[ModuleEntry, ...]
    #: ``"bundle"``: the chain is ``filters_text`` and ``modules``; :data:`CHAIN_LOCAL`: the
    #: device's own configured chain (``filters_text`` and ``filters_sha256`` empty, no modules)
    chain: str = "bundle"

    @classmethod
    def local(
        cls,
        *,
        fleet: str,
        version: int,
        priority: str,
        not_before: int,
        not_after: int,
        created: int,
        key_id: str,
    ) -> Manifest:
        """A local bundle's manifest: back to the chain the device's config names."""
        return cls(
            fleet,
            version,
            priority,
            not_before,
            not_after,
            created,
            key_id,
            "",
            "",
            (),
            CHAIN_LOCAL,
        )

    @property
    def is_local(self) -> bool:
        return self.chain == CHAIN_LOCAL

    @property
    def total_bytes(self) -> int:
        return sum(m.size for m in self.modules)

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "format": FORMAT,
            "fleet": self.fleet,
            "version": self.version,
            "priority": self.priority,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "created": self.created,
            "key_id": self.key_id,
        }
        if self.is_local:
            if self.filters_text or self.filters_sha256 or self.modules:
                raise ValueError("a local bundle carries no filters and no modules")
            return obj | {"chain": CHAIN_LOCAL}
        if self.chain != "bundle":
            raise ValueError(f"chain must be 'bundle' or {CHAIN_LOCAL!r}, not {self.chain!r}")
        return obj | {
            "filters": {"sha256": self.filters_sha256, "text": self.filters_text},
            "modules": [{"path": m.path, "sha256": m.sha256, "size": m.size} for m in self.modules],
        }


def encode_manifest(manifest: Manifest) -> bytes:
    """The canonical bytes of ``manifest`` (what is signed and sent)."""
    data = _canonical(manifest.to_obj())
    _parse(data)  # everything signed must also verify: bounds, paths, fields
    return data


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# -- keys -----------------------------------------------------------------------------------
def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _b64d(s: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", s):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def key_id(public: bytes) -> str:
    """The id of an Ed25519 public key (32 raw bytes): ``ed`` + 16 hex of its sha256."""
    return "ed" + hashlib.sha256(b"edgepipe-signing-key\n" + public).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A fleet public key; its text form is ``<key id> <base64url of 32 bytes>``."""

    raw: bytes

    @property
    def id(self) -> str:
        return key_id(self.raw)

    @property
    def line(self) -> str:
        return f"{self.id} {_b64e(self.raw)}"

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """From ``<key id> <base64url>`` (the id must be the key's) or the base64url alone;
        ``ValueError`` saying why not."""
        parts = text.split()
        if len(parts) not in (1, 2):
            raise ValueError("expected '<key id> <base64url public key>'")
        try:
            raw = _b64d(parts[-1])
        except ValueError:
            raise ValueError("the public key is not base64url") from None
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
        key = cls(raw)
        if len(parts) == 2 and parts[0] != key.id:
            raise ValueError(f"key id {parts[0]!r} is not this key's id ({key.id})")
        return key

    def verify(self, signature: bytes, data: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, _SIG_CONTEXT + data)
        except InvalidSignature:
            return False
        return True


def parse_public_keys(lines: Iterable[str]) -> dict[str, PublicKey]:
    """Key lines -> {key id: key}; ``ValueError`` naming the line that is wrong."""
    out: dict[str, PublicKey] = {}
    for n, line in enumerate(lines, 1):
        try:
            key = PublicKey.parse(line)
        except ValueError as e:
            raise ValueError(f"key {n}: {e}") from None
        out[key.id] = key
    return out


class SigningKey:
    """A fleet's Ed25519 private key (the cloud's).  Never printable; its text form (in a
    0600 key file, one line per key, the last one active) is ``<key id> <base64url seed>``."""

    __slots__ = ("_seed", "public")

    def __init__(self, seed: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        if len(seed) != 32:
            raise ValueError(f"an Ed25519 private key is 32 bytes, not {len(seed)}")
        self._seed = seed
        pub = Ed25519PrivateKey.from_private_bytes(seed).public_key()
        self.public = PublicKey(pub.public_bytes(Encoding.Raw, PublicFormat.Raw))

    def __repr__(self) -> str:
        return f"<SigningKey {self.id}>"

    @property
    def id(self) -> str:
        return self.public.id

    @classmethod
    def generate(cls) -> SigningKey:
        import os

        return cls(os.urandom(32))

    @property
    def line(self) -> str:
        """The key-file line (holds the private key)."""
        return f"{self.id} {_b64e(self._seed)}"

    @classmethod
    def parse_lines(cls, text: str, source: str) -> list[SigningKey]:
        """Every key of a key file's text, oldest first; ``ValueError`` naming the line."""
        keys: list[SigningKey] = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected '<key id> <base64url private key>'")
                key = cls(_b64d(parts[1]))
            except ValueError as e:
                raise ValueError(f"{source}: line {n}: {e}") from None
            if key.id != parts[0]:
                raise ValueError(f"{source}: line {n}: key id {parts[0]!r} is not this key's id")
            keys.append(key)
        if not keys:
            raise ValueError(f"{source}: no signing key found")
        return keys

    def sign(self, manifest_bytes: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self._seed).sign(_SIG_CONTEXT + manifest_bytes)


# -- checking -------------------------------------------------------------------------------
def check_path(path: Any) -> str:
    """A module path as a bundle may name it: relative, ``/``-separated, at most 8 parts of
    ``[A-Za-z0-9._-]`` not starting with ``.`` or ``-`` (so no ``..``, no hidden files),
    ending in ``.wasm``; ``ValueError`` saying why not."""
    if not isinstance(path, str) or not path:
        raise ValueError("a module path must be a non-empty string")
    if len(path) > MAX_PATH:
        raise ValueError(f"module path is longer than {MAX_PATH} characters")
    if path.startswith("/") or "\\" in path:
        raise ValueError(f"module path {path!r} must be relative, with '/' separators")
    parts = path.split("/")
    if len(parts) > 8:
        raise ValueError(f"module path {path!r} has more than 8 parts")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"module path {path!r} may not contain {part or 'an empty part'!r}")
        if not _PART.fullmatch(part):
            raise ValueError(
                f"module path {path!r}: part {part!r} has characters other than A-Z a-z 0-9 . _ -"
            )
    if not path.endswith(".wasm"):
        raise ValueError(f"module path {path!r} must end in .wasm")
    return path


def _int(obj: Mapping[str, Any], key: str, lo: int = 0) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < _MAX_INT:
        raise ValueError(f"{key} must be an integer from {lo} to 2**53")
    return v


def _parse(data: bytes) -> Manifest:
    """Canonical bytes -> :class:`Manifest`; ``ValueError`` for anything malformed."""
    try:
        obj = json.loads(data.decode("ascii"), parse_float=_no_float, parse_constant=_no_float)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not canonical JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("the manifest must be a JSON object")
    if _canonical(obj) != data:
        raise ValueError("the manifest is not in canonical form")
    local = "chain" in obj
    want = _LOCAL_KEYS if local else _KEYS
    if set(obj) != want:
        missing, extra = sorted(want - set(obj)), sorted(set(obj) - want)
        raise ValueError(f"manifest fields: missing {missing}, unknown {extra}")
    if obj["format"] != FORMAT:
        raise ValueError(f"format {obj['format']!r} is not {FORMAT}")
    fleet = obj["fleet"]
    if not isinstance(fleet, str) or not _FLEET.fullmatch(fleet):
        raise ValueError("fleet must be 1-64 of A-Z a-z 0-9 . _ -")
    version = _int(obj, "version", 1)
    if obj["priority"] not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}")
    nb, na, created = _int(obj, "not_before"), _int(obj, "not_after"), _int(obj, "created")
    if na <= nb:
        raise ValueError("not_after must be after not_before")
    kid = obj["key_id"]
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise ValueError("key_id is not a signing key id")
    if local:
        if obj["chain"] != CHAIN_LOCAL:
            raise ValueError(f"chain must be {CHAIN_LOCAL!r} (a manifest with a chain has filters)")
        return Manifest.local(
            fleet=fleet,
            version=version,
            priority=obj["priority"],
            not_before=nb,
            not_after=na,
            created=created,
            key_id=kid,
        )
    filters = obj["filters"]
    if not isinstance(filters, dict) or set(filters) != {"sha256", "text"}:
        raise ValueError("filters must be {sha256, text}")
    text = filters["text"]
    if not isinstance(text, str):
        raise ValueError("filters.text must be a string")
    raw = text.encode()
    if len(raw) > MAX_FILTERS_BYTES:
        raise ValueError(f"filters.text is larger than {MAX_FILTERS_BYTES} bytes")
    if filters["sha256"] != hashlib.sha256(raw).hexdigest():
        raise ValueError("filters.sha256 is not the sha256 of filters.text")
    mods = obj["modules"]
    if not isinstance(mods, list) or len(mods) > MAX_MODULES:
        raise ValueError(f"modules must be a list of at most {MAX_MODULES}")
    entries: list[ModuleEntry] = []
    for i, m in enumerate(mods):
        if not isinstance(m, dict) or set(m) != {"path", "sha256", "size"}:
            raise ValueError(f"modules[{i}] must be {{path, sha256, size}}")
        path = check_path(m["path"])
        if not isinstance(m["sha256"], str) or not _HEX64.fullmatch(m["sha256"]):
            raise ValueError(f"modules[{i}].sha256 must be 64 lowercase hex characters")
        size = _int(m, "size")
        if size > MAX_MODULE_BYTES:
            raise ValueError(f"modules[{i}] is larger than {MAX_MODULE_BYTES} bytes")
        entries.append(ModuleEntry(path, m["sha256"], size))
    paths = [e.path for e in entries]
    if paths != sorted(set(paths)):
        raise ValueError("module paths must be unique and in sorted order")
    if sum(e.size for e in entries) > MAX_TOTAL_BYTES:
        raise ValueError(f"the modules are larger than {MAX_TOTAL_BYTES} bytes in all")
    return Manifest(
        fleet,
        version,
        obj["priority"],
        nb,
        na,
        created,
        kid,
        text,
        filters["sha256"],
        tuple(entries),
    )


def decode_manifest(data: bytes) -> Manifest:
    """Canonical manifest bytes -> :class:`Manifest` *without* checking any signature (the
    cloud re-reading what it signed); ``ValueError`` for anything malformed."""
    return _parse(data)


def _no_float(s: str) -> Any:
    raise ValueError(f"{s!r}: only integers are allowed")


def verify(
    manifest_bytes: bytes,
    signature: bytes,
    envelope_key_id: str,
    *,
    trusted: Mapping[str, PublicKey],
    retired: Mapping[str, PublicKey] | Iterable[str] = (),
    now_ms: int,
    applied_version: int = 0,
    fleet: str | None = None,
) -> Manifest:
    """The manifest, if it is signed by a trusted key, well formed, valid at ``now_ms``, for
    ``fleet`` (when given) and newer than ``applied_version``; else :class:`BundleRefused`.
    A key in ``retired`` is refused even if it is also trusted."""
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise BundleRefused("too_large", f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    kid = envelope_key_id if isinstance(envelope_key_id, str) else ""
    if kid in retired:
        raise BundleRefused("retired_key", f"signed with retired key {kid[:32]!r}")
    key = trusted.get(kid)
    if key is None:
        raise BundleRefused(
            "unknown_key", f"signed with key {kid[:32]!r}, which is not a trusted fleet key"
        )
    if len(signature) != 64 or not key.verify(signature, manifest_bytes):
        raise BundleRefused("bad_signature", f"the signature does not verify with key {kid}")
    try:
        m = _parse(manifest_bytes)
    except ValueError as e:
        raise BundleRefused("malformed", str(e)) from None
    if m.key_id != kid:
        raise BundleRefused("malformed", "the manifest names another key than its signature")
    if fleet is not None and m.fleet != fleet:
        raise BundleRefused(
            "malformed", f"the bundle is for fleet {m.fleet!r}, not {fleet!r}", version=m.version
        )
    if now_ms < m.not_before:
        raise BundleRefused(
            "not_yet_valid", f"valid from {m.not_before} ms, now {now_ms}", version=m.version
        )
    if now_ms >= m.not_after:
        raise BundleRefused(
            "expired", f"valid until {m.not_after} ms, now {now_ms}", version=m.version
        )
    if m.version <= applied_version:
        raise BundleRefused(
            "downgrade",
            f"version {m.version} is not above version {applied_version}, the highest applied here",
            version=m.version,
        )
    return m


def check_module(entry: ModuleEntry, data: bytes, *, version: int | None = None) -> None:
    """``data`` is the module ``entry`` names, or :class:`BundleRefused`."""
    if len(data) != entry.size:
        reason = "too_large" if len(data) > entry.size else "hash_mismatch"
        raise BundleRefused(
            reason,
            f"module {entry.path}: {len(data)} bytes, the manifest says {entry.size}",
            version=version,
        )
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise BundleRefused(
            "hash_mismatch", f"module {entry.path}: sha256 is not {entry.sha256}", version=version
        )


def envelope(manifest_bytes: bytes, signature: bytes, kid: str) -> dict[str, str]:
    """The JSON the receiver sends a device: the manifest and signature in base64url."""
    return {"manifest": _b64e(manifest_bytes), "signature": _b64e(signature), "key_id": kid}


def open_envelope(obj: Any) -> tuple[bytes, bytes, str]:
    """The parts of :func:`envelope`'s JSON, or :class:`BundleRefused` (``malformed``,
    ``too_large``)."""
    if not isinstance(obj, dict) or not all(
        isinstance(obj.get(k), str) for k in ("manifest", "signature", "key_id")
    ):
        raise BundleRefused(
            "malformed", "the envelope needs manifest, signature and key_id strings"
        )
    if len(obj["manifest"]) > MAX_MANIFEST_BYTES * 4 // 3 + 4:
        raise BundleRefused("too_large", f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    if len(obj["signature"]) > 128 or len(obj["key_id"]) > 64:
        raise BundleRefused("malformed", "signature or key_id is too long")
    try:
        return _b64d(obj["manifest"]), _b64d(obj["signature"]), obj["key_id"]
    except ValueError:
        raise BundleRefused("malformed", "manifest or signature is not base64url") from None
