"""``edgepipe-cloud signing-key ...``, ``bundle ...`` and ``devices desire``: the fleet's
signing key, signed chain bundles and what each device should run (docs/rollout.md).

The signing key is kept like the master key: a 0600 file (``--signing-key-file`` or
``EDGEPIPE_CLOUD_SIGNING_KEY_FILE``) or the key lines in ``EDGEPIPE_CLOUD_SIGNING_KEY``, one
``<key id> <base64url Ed25519 seed>`` per line; the last line signs new bundles, older lines
stay listed (``signing-key list``) as the keys devices may still trust until they retire them.
The receiver (``serve``) never needs it: it serves bundles signed already.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from core._clock import now_ms
from protocol._abi import abi_problems
from protocol._bundle import (
    MAX_FILTERS_BYTES,
    MAX_MODULE_BYTES,
    MAX_MODULES,
    MAX_TOTAL_BYTES,
    Manifest,
    ModuleEntry,
    SigningKey,
    check_path,
    decode_manifest,
    encode_manifest,
)
from protocol._keys import append_key_line, read_key_file, write_new_key_file

from ._backend import Backend
from ._bundles import BundleVersionTaken, UnknownBundle
from ._errors import CloudError
from ._settings import Settings

__all__ = [
    "BundleSourceError",
    "SigningKeyError",
    "bundle_command",
    "desire_command",
    "load_signing_keys",
    "read_bundle_source",
    "signing_key_command",
]

SIGNING_KEY_FILE_ENV = "EDGEPIPE_CLOUD_SIGNING_KEY_FILE"
SIGNING_KEY_ENV = "EDGEPIPE_CLOUD_SIGNING_KEY"
#: Bundles are valid from a few minutes before they are made (devices' clocks drift).
NOT_BEFORE_SLACK_MS = 10 * 60_000


class SigningKeyError(CloudError):
    """No signing key, or one that cannot be read, is too permissive or does not parse."""


class BundleSourceError(CloudError):
    """A filters file (or one of its modules) that cannot become a bundle; ``path`` is the
    file the problem is in."""

    def __init__(self, path: str, message: str) -> None:
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}")


# -- the signing key --------------------------------------------------------------------------
def no_signing_key() -> SigningKeyError:
    return SigningKeyError(
        "no signing key configured: set EDGEPIPE_CLOUD_SIGNING_KEY_FILE or --signing-key-file "
        "(a 0600 file), or EDGEPIPE_CLOUD_SIGNING_KEY; 'edgepipe-cloud signing-key generate "
        "--out FILE' makes one"
    )


def load_signing_keys(settings: Settings) -> tuple[list[SigningKey], str, Path | None]:
    """(keys oldest first, where they come from, the file) or :class:`SigningKeyError`."""
    if settings.signing_key_file:
        path = Path(settings.signing_key_file)
        text = read_key_file(path, "signing key", SigningKeyError)
        source: str = str(path)
    elif settings.signing_key is not None:
        path, text, source = None, settings.signing_key.get_secret_value(), f"${SIGNING_KEY_ENV}"
    else:
        raise no_signing_key()
    try:
        return SigningKey.parse_lines(text, source), source, path
    except ValueError as e:
        raise SigningKeyError(str(e)) from None


def _public_json(key: SigningKey, status: str) -> str:
    return json.dumps({"key_id": key.id, "public_key": key.public.line, "status": status})


def signing_key_command(args: argparse.Namespace, settings: Settings | None) -> int:
    if args.action == "generate":
        key = SigningKey.generate()
        if args.out is None:
            sys.stdout.write(key.line + "\n")
            print(
                f"public key (for the devices' sync.bundles.trusted_keys): {key.public.line}",
                file=sys.stderr,
            )
            return 0
        try:
            write_new_key_file(args.out, key.line + "\n")
        except FileExistsError:
            print(f"edgepipe-cloud: {args.out} exists; not overwriting a key", file=sys.stderr)
            return 1
        print(key.public.line)
        print(
            f"signing key {key.id} written to {args.out} (mode 0600); the line above is its "
            "public key: put it in every device's sync.bundles.trusted_keys",
            file=sys.stderr,
        )
        return 0
    assert settings is not None
    keys, source, path = load_signing_keys(settings)
    if args.action == "list":
        for i, key in enumerate(keys):
            print(_public_json(key, "active" if i == len(keys) - 1 else "previous"))
        return 0
    # rotate
    if path is None:
        raise SigningKeyError(
            f"the signing key comes from {source}, which edgepipe-cloud cannot change: put a "
            "new line ('edgepipe-cloud signing-key generate') after the old one there"
        )
    if path.is_symlink():
        raise SigningKeyError(
            f"{path} is a link (a mounted Secret?): add a new last line "
            "('edgepipe-cloud signing-key generate') to the Secret instead"
        )
    new = SigningKey.generate()
    append_key_line(path, new.line)
    print(new.public.line)
    print(
        f"signing key {new.id} added to {path}: bundles made from now on are signed with it. "
        f"Devices refuse them (unknown_key) until their sync.bundles.trusted_keys has the line "
        f"above; until then sign with the previous key: 'bundle create --key {keys[-1].id}'. "
        f"Once every device trusts {new.id} and runs a bundle it signed, move "
        f"{keys[-1].id} to their sync.bundles.retired_keys: a bundle signed with it is "
        "then refused even if it was captured earlier",
        file=sys.stderr,
    )
    return 0


# -- reading a filters file ---------------------------------------------------------------------
def read_bundle_source(filters: Path) -> tuple[str, list[tuple[ModuleEntry, bytes]]]:
    """The filters file's text and every module it names (path as written, relative to the
    file), checked as far as the cloud can without the edge's sandbox: the YAML's shape,
    module paths (relative, below the file's directory), sizes, the ABI v1 imports and
    exports (:func:`protocol._abi.abi_problems`) and any ``sha256:`` pin.  :class:`BundleSourceError` for the first problem."""
    shown = str(filters)
    try:
        raw = filters.read_bytes()
    except OSError as e:
        raise BundleSourceError(shown, f"cannot read the filters file: {e.strerror}") from None
    if len(raw) > MAX_FILTERS_BYTES:
        raise BundleSourceError(shown, f"larger than {MAX_FILTERS_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        data = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise BundleSourceError(shown, f"not a YAML filters file: {e}") from None
    stages = data.get("chain") if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("version", 1) != 1:
        raise BundleSourceError(shown, "version must be 1")
    if not isinstance(stages, list) or not stages:
        raise BundleSourceError(shown, "expected a `chain:` list of stages")
    by_path: dict[str, tuple[ModuleEntry, bytes]] = {}
    base = filters.resolve().parent
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or not isinstance(st.get("module"), str):
            raise BundleSourceError(shown, f"stage {i + 1}: needs a `module:` path")
        name = st.get("name", f"#{i + 1}")
        rel = st["module"]
        try:
            check_path(rel)
        except ValueError as e:
            raise BundleSourceError(
                shown, f"stage {name!r}: {e} (modules must be below the filters file's directory)"
            ) from None
        if rel in by_path:
            entry = by_path[rel][0]
        else:
            p = base / rel
            try:
                size = p.stat().st_size
                if size > MAX_MODULE_BYTES:
                    raise BundleSourceError(
                        shown, f"stage {name!r}: {rel} is larger than {MAX_MODULE_BYTES} bytes"
                    )
                blob = p.read_bytes()
            except OSError as e:
                raise BundleSourceError(
                    shown, f"stage {name!r}: cannot read {rel}: {e.strerror}"
                ) from None
            problems = abi_problems(blob)
            if problems:
                raise BundleSourceError(
                    shown, f"stage {name!r}: {rel}: {'; '.join(problems)} (filters/ABI.md)"
                )
            entry = ModuleEntry(rel, hashlib.sha256(blob).hexdigest(), len(blob))
            by_path[rel] = (entry, blob)
        pin = st.get("sha256")
        if pin is not None and pin != entry.sha256:
            raise BundleSourceError(
                shown, f"stage {name!r}: sha256 {pin} does not match {rel} ({entry.sha256})"
            )
    if len(by_path) > MAX_MODULES:
        raise BundleSourceError(shown, f"more than {MAX_MODULES} modules")
    if sum(e.size for e, _ in by_path.values()) > MAX_TOTAL_BYTES:
        raise BundleSourceError(
            shown, f"the modules are larger than {MAX_TOTAL_BYTES} bytes in all"
        )
    return text, [by_path[k] for k in sorted(by_path)]


def create_bundle(
    backend: Backend,
    key: SigningKey,
    filters: Path,
    *,
    fleet: str,
    priority: str,
    valid_days: float,
    now: int | None = None,
) -> dict[str, Any]:
    """Read, check, sign and store a bundle with the next version; -> its summary."""
    text, modules = read_bundle_source(filters)
    new = sum(backend.put_module(e.sha256, blob) for e, blob in modules)
    return _sign_and_store(
        backend,
        key,
        text,
        [e for e, _ in modules],
        new,
        fleet=fleet,
        priority=priority,
        valid_days=valid_days,
        now=now,
    )


def create_local_bundle(
    backend: Backend,
    key: SigningKey,
    *,
    fleet: str,
    priority: str,
    valid_days: float,
    now: int | None = None,
) -> dict[str, Any]:
    """Sign and store a *local bundle* with the next version: no chain of its own, it sends
    a device back to the chain its own config names (its ``chain_file``)."""
    return _sign_and_store(
        backend,
        key,
        None,
        [],
        0,
        fleet=fleet,
        priority=priority,
        valid_days=valid_days,
        now=now,
    )


def reissue_bundle(
    backend: Backend,
    key: SigningKey,
    version: int,
    *,
    fleet: str,
    priority: str,
    valid_days: float,
    now: int | None = None,
) -> dict[str, Any]:
    """The chain of stored bundle ``version`` (its filters text and modules, unchanged)
    signed again as the next version: how a fleet goes back to an earlier chain, since a
    device never applies a version lower than one it has applied."""
    old = backend.get_bundle(version)
    if old is None:
        raise UnknownBundle(version)
    m = decode_manifest(old["manifest"])
    return _sign_and_store(
        backend,
        key,
        None if m.is_local else m.filters_text,
        list(m.modules),
        0,
        fleet=fleet,
        priority=priority,
        valid_days=valid_days,
        now=now,
        extra={"from_version": version},
    )


def _sign_and_store(
    backend: Backend,
    key: SigningKey,
    text: str | None,
    modules: list[ModuleEntry],
    new: int,
    *,
    fleet: str,
    priority: str,
    valid_days: float,
    now: int | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``text`` None: a local bundle."""
    now = now_ms() if now is None else now
    for _ in range(10):  # another `bundle create` may take the version meanwhile
        common: dict[str, Any] = {
            "fleet": fleet,
            "version": backend.next_bundle_version(),
            "priority": priority,
            "not_before": now - NOT_BEFORE_SLACK_MS,
            "not_after": now + int(valid_days * 86_400_000),
            "created": now,
            "key_id": key.id,
        }
        if text is None:
            manifest = Manifest.local(**common)
        else:
            manifest = Manifest(
                **common,
                filters_text=text,
                filters_sha256=hashlib.sha256(text.encode()).hexdigest(),
                modules=tuple(modules),
            )
        data = encode_manifest(manifest)
        try:
            backend.add_bundle(manifest, data, key.sign(data), now=now)
        except BundleVersionTaken:
            continue
        return {
            "version": manifest.version,
            "priority": priority,
            "key_id": key.id,
            "fleet": fleet,
            "chain": manifest.chain,
            "modules": len(modules),
            "new_modules": new,
            "total_bytes": manifest.total_bytes,
            "not_after": manifest.not_after,
            **(extra or {}),
        }
    raise CloudError("could not take a bundle version (too many concurrent bundle creates)")


def bundle_command(args: argparse.Namespace, settings: Settings, backend: Backend) -> int:
    if args.action == "list":
        for b in backend.list_bundles():
            print(json.dumps(b, sort_keys=True))
        return 0
    keys, source, _ = load_signing_keys(settings)
    key = keys[-1]
    if args.key:
        found = [k for k in keys if k.id == args.key]
        if not found:
            raise SigningKeyError(f"no signing key {args.key!r} in {source}")
        key = found[0]
    opts = {"fleet": settings.fleet, "priority": args.priority, "valid_days": args.valid_days}
    if args.from_version is not None:
        summary = reissue_bundle(backend, key, args.from_version, **opts)
    elif args.local:
        summary = create_local_bundle(backend, key, **opts)
    else:
        summary = create_bundle(backend, key, Path(args.filters), **opts)
    print(json.dumps(summary, sort_keys=True))
    print(
        f"bundle version {summary['version']} signed with {key.id} and stored; "
        f"'edgepipe-cloud devices desire NAME {summary['version']}' sends it to a device",
        file=sys.stderr,
    )
    return 0


def desire_command(args: argparse.Namespace, backend: Backend) -> int:
    version = None if args.version == "none" else int(args.version)
    reason = args.reason or ("cleared by operator" if version is None else "set by operator")
    backend.set_desired(args.name, version, reason, now=now_ms())
    print(
        f"device {args.name!r} now desires "
        + ("no bundle" if version is None else f"bundle version {version}"),
        file=sys.stderr,
    )
    return 0


def add_parsers(sub: Any, command: Any, exits: Any, db_cmd: str, no_db: str) -> None:
    """The ``signing-key`` and ``bundle`` commands of the parser (:mod:`cloud._cli_args`)."""
    key_hint = ", no signing key or one readable by others"
    skey = command(
        sub,
        "signing-key",
        "the fleet's Ed25519 key that signs bundles",
        exits("see the actions", key_hint),
    )
    ssub = skey.add_subparsers(dest="action", required=True, metavar="ACTION")
    gen = command(
        ssub,
        "generate",
        "make a new signing key (no database involved); prints its public key line",
        exits("the file exists (it is never overwritten) or cannot be written"),
    )
    gen.add_argument("--out", help="write it to this new file (mode 0600) instead of stdout")
    lst = command(
        ssub, "list", "the signing keys' public key lines (JSON lines)", exits("", key_hint)
    )
    rot = command(
        ssub,
        "rotate",
        "add a new signing key line to the key file; new bundles are signed with it",
        exits("the key file cannot be written", key_hint),
    )
    bundle = command(sub, "bundle", "signed chain bundles", exits(db_cmd, no_db))
    bsub = bundle.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = command(
        bsub,
        "create",
        "check, sign and store a filters file and its modules as the next bundle version",
        exits(f"the filters file or a module is refused; {db_cmd}", no_db + key_hint),
    )
    create.add_argument("filters", metavar="FILTERS.yaml", nargs="?")
    create.add_argument(
        "--from",
        dest="from_version",
        type=int,
        metavar="VERSION",
        help="instead of a filters file: sign the chain of stored bundle VERSION again as the "
        "next version (going back to an earlier chain; devices never apply a lower version)",
    )
    create.add_argument(
        "--local",
        action="store_true",
        help="instead of a filters file: a local bundle, which sends a device back to the "
        "chain its own pipeline.yaml names (chain_file); rolls back a device that ran no bundle",
    )
    create.add_argument(
        "--priority",
        choices=["normal", "urgent"],
        default="normal",
        help="urgent bundles may use a metered link (cellular); normal ones wait for an unmetered one",
    )
    create.add_argument(
        "--valid-days",
        type=float,
        default=90.0,
        help="devices refuse the bundle after this many days (default 90)",
    )
    create.add_argument(
        "--key", help="sign with this key id of the key file (default: its last line)"
    )
    for p in (lst, rot, create):
        p.add_argument(
            "--signing-key-file",
            metavar="FILE",
            help=f"file (mode 0600) with the signing key lines; else ${SIGNING_KEY_FILE_ENV}, "
            f"else the key lines in ${SIGNING_KEY_ENV}",
        )
    command(bsub, "list", "list bundles, newest first (JSON lines)", exits(db_cmd, no_db))


def add_desire_parser(dsub: Any, command: Any, exits: Any, db_cmd: str, no_db: str) -> None:
    desire = command(
        dsub,
        "desire",
        "set the bundle version a device should run ('none': clear it)",
        exits(f"no device or bundle of that name; {db_cmd}", no_db),
    )
    desire.add_argument("name")
    desire.add_argument("version", help="a bundle version, or 'none'")
    desire.add_argument("--reason", help="recorded with the change")
    command(
        dsub,
        "bundles",
        "every device's desired and reported bundle (JSON lines)",
        exits(db_cmd, no_db),
    )


def bundles_listing(backend: Backend) -> int:
    for s in backend.bundle_states():
        print(json.dumps(s, sort_keys=True))
    return 0


def signing_key_source(settings: Settings) -> str:
    if settings.signing_key_file:
        return settings.signing_key_file
    return f"${SIGNING_KEY_ENV}" if os.environ.get(SIGNING_KEY_ENV) else "none configured"
