"""``edgepipe-cloud``: run the receiver and manage device credentials and operators.

    edgepipe-cloud master-key generate --out /etc/edgepipe/cloud-master.key   # 0600
    edgepipe-cloud init --db sqlite:///cloud.db            # creates the database
    edgepipe-cloud serve --db sqlite:///cloud.db --host 0.0.0.0 --port 8443 \\
        --master-key-file /etc/edgepipe/cloud-master.key \\
        [--max-body-mb 8] [--tls-cert cert.pem --tls-key key.pem] [--alerts alerts.yaml]
    edgepipe-cloud devices add NAME        # prints the device secret, once
    edgepipe-cloud devices list
    edgepipe-cloud devices remove NAME     # and everything stored for it
    edgepipe-cloud users add NAME          # dashboard operator; prompts for the password twice
    edgepipe-cloud users add NAME --password-stdin
    edgepipe-cloud users list | remove NAME
    edgepipe-cloud master-key rotate       # new key line in the file, re-seal every secret
    edgepipe-cloud master-key rotate --keep-key   # re-seal with the key's last line as is
    edgepipe-cloud signing-key generate --out /etc/edgepipe/fleet-signing.key   # 0600
    edgepipe-cloud signing-key list | rotate   # public key lines; a new signing key line
    edgepipe-cloud bundle create filters.yaml [--priority urgent]   # sign the next version
    edgepipe-cloud bundle create --from 3        # bundle 3's chain again, as the next version
    edgepipe-cloud bundle list
    edgepipe-cloud devices desire NAME VERSION   # what the device should run
    edgepipe-cloud devices bundles               # desired and reported bundle per device
    edgepipe-cloud devices add NAME --label site=north   # labels pick rollout groups
    edgepipe-cloud devices label NAME ring=beta [--remove site]
    edgepipe-cloud rollout start VERSION --group site=north [--canary 1] [--wave 25%] \\
        [--soak 30m] [--policy device|all]
    edgepipe-cloud rollout status [ID] | list | pause ID | resume ID | abort ID

The global options ``--db`` and ``--master-key-file`` go before or after any command
(:mod:`cloud._cli_args`).  The database is ``--db``, else ``EDGEPIPE_CLOUD_DB``, else
``sqlite:///edgepipe-cloud.db`` in the current directory; only ``serve`` and ``init`` create
it, every other command refuses a database that does not exist (exit status 2).

Device secrets are stored sealed with the master key (``--master-key-file`` or
``EDGEPIPE_CLOUD_MASTER_KEY_FILE``, or the key lines in ``EDGEPIPE_CLOUD_MASTER_KEY``);
``serve`` and ``devices add`` refuse to run without it.  Every option can also come from the
environment (``EDGEPIPE_CLOUD_DB``, ``EDGEPIPE_CLOUD_API_TOKEN``, ``EDGEPIPE_CLOUD_PORT`` ...).

Exit status: 0 done, 1 the command failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from pydantic import ValidationError

from core._errors import ConfigError
from protocol._keys import append_key_line

from ._backend import SCHEMA_VERSION, Backend
from ._bundle_cli import (
    BundleSourceError,
    SigningKeyError,
    bundle_command,
    bundles_listing,
    desire_command,
    signing_key_command,
)
from ._bundles import UnknownBundle
from ._cli_args import DB_ENV, EXIT_FAILED, EXIT_OK, EXIT_USAGE, Source, db_source, parser
from ._errors import BadDatabaseURL, CloudError, DeviceExists, NoDatabase, OperatorExists
from ._open import open_backend
from ._rollout_cli import ERRORS as ROLLOUT_ERRORS
from ._rollout_cli import add_labels, check_labels, label_command, rollout_command
from ._secrets import (
    MasterKey,
    MasterKeyError,
    generate_master_key_line,
    no_master_key,
    write_new_key_file,
)
from ._settings import Settings

__all__ = ["main"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _open(settings: Settings, *, create: bool = False) -> Backend:
    """The backend, with the master key if one is configured (checked, plaintext sealed).
    Without ``create`` a database that does not exist is refused (:class:`NoDatabase`)."""
    return open_backend(settings.db, master_key=MasterKey.from_settings(settings), create=create)


def _serve(settings: Settings, log_level: str) -> int:
    import uvicorn

    from ._app import create_app

    if MasterKey.from_settings(settings) is None:
        raise no_master_key()
    # Opened here, not in the app's startup, so a wrong key ends the command with its
    # message (and before anything is written or served).
    backend = _open(settings, create=True)
    try:
        app = create_app(settings, backend=backend)
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            ssl_certfile=settings.tls_cert,
            ssl_keyfile=settings.tls_key,
            log_level=log_level,
            proxy_headers=False,
        )
    finally:
        backend.close()
    return 0


def _init(settings: Settings) -> int:
    try:
        backend = _open(settings)
    except NoDatabase as exc:
        with _open(settings, create=True):
            pass
        print(f"created the edgepipe-cloud database at {exc.where}", file=sys.stderr)
        return EXIT_OK
    backend.close()
    print(
        f"the edgepipe-cloud database is up to date (schema version {SCHEMA_VERSION})",
        file=sys.stderr,
    )
    return EXIT_OK


def _fail(msg: str, code: int = EXIT_FAILED) -> int:
    print(f"edgepipe-cloud: {msg}", file=sys.stderr)
    return code


def _bad_name(kind: str, name: str) -> int | None:
    """Exit code 2 with a message when ``name`` is not a valid device or user name."""
    if _NAME.fullmatch(name):
        return None
    return _fail(f"{kind} names are 1-64 chars of letters, digits, '.', '_', '-'", EXIT_USAGE)


def _devices(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "add":
        if (bad := _bad_name("device", args.name)) is not None:
            return bad
        if MasterKey.from_settings(settings) is None:
            raise no_master_key()
        check_labels(args.label)
    with _open(settings) as backend:
        if args.action == "add":
            secret = os.urandom(32)
            try:
                backend.add_device(args.name, secret)
            except DeviceExists as exc:
                return _fail(str(exc))
            add_labels(backend, args.name, args.label)
            print(secret.hex())
            print(
                f"device {args.name!r} added; the secret above is shown only once: "
                "put it in the device's sync configuration",
                file=sys.stderr,
            )
        elif args.action == "list":
            labels = backend.device_labels()
            for device in backend.list_devices():
                device["labels"] = labels.get(device["name"], {})
                print(json.dumps(device, sort_keys=True))
        elif args.action == "remove":
            if not backend.remove_device(args.name):
                return _fail(f"no device named {args.name!r}")
            print(f"device {args.name!r} removed", file=sys.stderr)
        elif args.action == "desire":
            if args.version != "none" and not args.version.isdigit():
                return _fail("VERSION is a bundle version number or 'none'", EXIT_USAGE)
            return desire_command(args, backend)
        elif args.action == "bundles":
            return bundles_listing(backend)
        elif args.action == "label":
            return label_command(args, backend)
    return 0


def _read_password(from_stdin: bool) -> str | None:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass("Password: ")
    if getpass.getpass("Password (again): ") != first:
        _fail("the passwords do not match")
        return None
    return first


def _users(args: argparse.Namespace, settings: Settings) -> int:
    from ._auth import hash_password

    if args.action == "add" and (bad := _bad_name("user", args.name)) is not None:
        return bad
    with _open(settings) as backend:
        if args.action == "add":
            password = _read_password(args.password_stdin)
            if password is None:
                return 1
            if len(password) < 8:
                return _fail("the password must be at least 8 characters", EXIT_USAGE)
            try:
                backend.add_operator(args.name, hash_password(password))
            except OperatorExists as exc:
                return _fail(str(exc))
            print(f"operator {args.name!r} added", file=sys.stderr)
        elif args.action == "list":
            for op in backend.list_operators():
                print(json.dumps(op, sort_keys=True))
        elif args.action == "remove":
            if not backend.remove_operator(args.name):
                return _fail(f"no operator named {args.name!r}")
            print(f"operator {args.name!r} removed and signed out", file=sys.stderr)
    return 0


def _master_key(args: argparse.Namespace, settings: Settings | None) -> int:
    if args.action == "generate":
        line = generate_master_key_line() + "\n"
        if args.out is None:
            sys.stdout.write(line)
            return 0
        try:
            write_new_key_file(args.out, line)
        except FileExistsError:
            return _fail(f"{args.out} exists; not overwriting a key")
        print(f"master key written to {args.out} (mode 0600)", file=sys.stderr)
        return 0
    assert settings is not None
    key = MasterKey.from_settings(settings)
    if key is None:
        raise no_master_key()
    if not args.keep_key and key.path is None:
        raise MasterKeyError(
            f"the master key comes from {key.source}, which edgepipe-cloud cannot change: put "
            "a new line ('edgepipe-cloud master-key generate') after the old one there, restart "
            "the receivers, then run 'edgepipe-cloud master-key rotate --keep-key'"
        )
    # The current key must open this database before the key file is touched.
    with open_backend(settings.db, master_key=key, create=False) as backend:
        old = key.ids
        if not args.keep_key:
            assert key.path is not None
            _append_key_line(key.path, generate_master_key_line())
            key = MasterKey.from_file(key.path)
            backend.master_key = key
        n = backend.rewrap_secrets()
    stale = [k for k in old if k != key.active_id]
    print(f"re-sealed {n} device secret(s) with master key {key.active_id!r}", file=sys.stderr)
    if stale:
        print(
            f"no device secret needs key(s) {', '.join(stale)} any more: remove their lines from "
            f"{key.source} once no backup of the database made before now is needed",
            file=sys.stderr,
        )
    return 0


def _append_key_line(path: os.PathLike[str] | str, line: str) -> None:
    """Add ``line`` as the new last (active) line of the key file: a new 0600 file renamed
    over the old one, so a crash leaves the old or the new file, never half of one."""
    from pathlib import Path

    path = Path(path)
    if path.is_symlink():
        raise MasterKeyError(
            f"{path} is a link (a mounted Secret?): update the Secret with a new last line "
            "('edgepipe-cloud master-key generate'), restart the receivers, then run "
            "'edgepipe-cloud master-key rotate --keep-key'"
        )
    append_key_line(path, line)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser(argv).parse_args(argv)
    db, key_file = getattr(args, "db", None), getattr(args, "master_key_file", None)
    try:
        if args.command == "master-key" and args.action == "generate":
            return _master_key(args, None)
        if args.command == "signing-key" and args.action == "generate":
            return signing_key_command(args, None)
        if args.command == "serve":
            settings = Settings.from_env(
                db=db,
                host=args.host,
                port=args.port,
                max_body_mb=args.max_body_mb,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                master_key_file=key_file,
                alerts_file=args.alerts,
            )
            return _serve(settings, args.log_level)
        settings = Settings.from_env(
            db=db,
            master_key_file=key_file,
            signing_key_file=getattr(args, "signing_key_file", None),
        )
        if args.command == "signing-key":
            return signing_key_command(args, settings)
        if args.command == "bundle":
            if args.action == "create" and _sources(args) != 1:
                return _fail(
                    "give FILTERS.yaml, --from VERSION or --local (one of them)", EXIT_USAGE
                )
            with _open(settings) as backend:
                return bundle_command(args, settings, backend)
        if args.command == "rollout":
            with _open(settings) as backend:
                return rollout_command(args, settings, backend)
        if args.command == "init":
            return _init(settings)
        if args.command == "master-key":
            return _master_key(args, settings)
        if args.command == "users":
            return _users(args, settings)
        return _devices(args, settings)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        return _fail(f"invalid settings: {errors}", EXIT_USAGE)
    except NoDatabase as exc:
        return _fail(_no_database(exc, db_source(db)), EXIT_USAGE)
    except BadDatabaseURL as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (MasterKeyError, SigningKeyError, ConfigError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ROLLOUT_ERRORS as exc:
        return _fail(str(exc))
    except (BundleSourceError, UnknownBundle) as exc:
        return _fail(str(exc))
    except (CloudError, OSError) as exc:
        return _fail(str(exc))


def _no_database(exc: NoDatabase, source: Source) -> str:
    if source.origin == "--db":
        origin = "given with --db"
    elif source.origin == "the default":
        origin = f"the default: neither --db nor ${DB_ENV} is set"
    else:
        origin = f"from {source.origin}"
    if exc.url.startswith(("postgresql://", "postgres://")) and "has no database" in exc.reason:
        create = "create it on the server (createdb), then run 'edgepipe-cloud init --db URL'"
    else:
        create = "create a new one with 'edgepipe-cloud init --db URL'"
    return (
        f"{exc} (database {exc.url}, {origin}). Point at the receiver's database (the one "
        f"'serve' uses) with --db URL or {DB_ENV}=URL, or {create}"
    )


def _sources(args: argparse.Namespace) -> int:
    """How many of ``bundle create``'s chain sources are given (exactly one must be)."""
    return sum(v is not None for v in (args.filters, args.from_version, args.local or None))


if __name__ == "__main__":
    sys.exit(main())
