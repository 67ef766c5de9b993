"""``edgepipe-cloud``: run the receiver and manage device credentials.

    edgepipe-cloud serve --db sqlite:///cloud.db --host 0.0.0.0 --port 8443 \\
        [--max-body-mb 8] [--tls-cert cert.pem --tls-key key.pem]
    edgepipe-cloud devices add NAME        # prints the device secret, once
    edgepipe-cloud devices list
    edgepipe-cloud devices remove NAME     # and everything stored for it
    edgepipe-cloud users add NAME          # dashboard operator; prompts for the password twice
    edgepipe-cloud users add NAME --password-stdin
    edgepipe-cloud users list | remove NAME

Every option can also come from the environment (``EDGEPIPE_CLOUD_DB``,
``EDGEPIPE_CLOUD_API_TOKEN``, ``EDGEPIPE_CLOUD_PORT`` ...).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from pydantic import ValidationError

from ._backend import DeviceExists, OperatorExists, open_backend
from ._errors import CloudError
from ._settings import Settings

__all__ = ["main"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepipe-cloud", description="edgepipe cloud receiver")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the receiver (uvicorn)")
    serve.add_argument("--db", help="sqlite:///path.db or postgresql://user@host:port/db")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--max-body-mb", type=float, help="largest upload body (default 8)")
    serve.add_argument("--tls-cert")
    serve.add_argument("--tls-key")
    serve.add_argument("--log-level", default="info")

    devices = sub.add_parser("devices", help="manage device credentials")
    devices.add_argument("--db", help="database URL (default: $EDGEPIPE_CLOUD_DB)")
    dsub = devices.add_subparsers(dest="action", required=True)
    add = dsub.add_parser("add", help="register a device and print its secret once")
    add.add_argument("name")
    dsub.add_parser("list", help="list devices and their sync status (JSON lines)")
    rm = dsub.add_parser("remove", help="remove a device and everything stored for it")
    rm.add_argument("name")

    users = sub.add_parser("users", help="manage dashboard operators")
    users.add_argument("--db", help="database URL (default: $EDGEPIPE_CLOUD_DB)")
    usub = users.add_subparsers(dest="action", required=True)
    uadd = usub.add_parser("add", help="add an operator (password hashed with argon2id)")
    uadd.add_argument("name")
    uadd.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (one line)"
    )
    usub.add_parser("list", help="list operators")
    urm = usub.add_parser("remove", help="remove an operator and end their sessions")
    urm.add_argument("name")
    return p


def _serve(settings: Settings, log_level: str) -> int:
    import uvicorn

    from ._app import create_app

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        log_level=log_level,
        proxy_headers=False,
    )
    return 0


def _devices(args: argparse.Namespace, settings: Settings) -> int:
    with open_backend(settings.db) as backend:
        if args.action == "add":
            if not _NAME.fullmatch(args.name):
                print(
                    "edgepipe-cloud: device names are 1-64 chars of letters, digits, '.', '_', '-'",
                    file=sys.stderr,
                )
                return 2
            secret = os.urandom(32)
            try:
                backend.add_device(args.name, secret)
            except DeviceExists as exc:
                print(f"edgepipe-cloud: {exc}", file=sys.stderr)
                return 1
            print(secret.hex())
            print(
                f"device {args.name!r} added; the secret above is shown only once: "
                "put it in the device's sync configuration",
                file=sys.stderr,
            )
        elif args.action == "list":
            for device in backend.list_devices():
                print(json.dumps(device, sort_keys=True))
        elif args.action == "remove":
            if not backend.remove_device(args.name):
                print(f"edgepipe-cloud: no device named {args.name!r}", file=sys.stderr)
                return 1
            print(f"device {args.name!r} removed", file=sys.stderr)
    return 0


def _read_password(from_stdin: bool) -> str | None:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass("Password: ")
    if getpass.getpass("Password (again): ") != first:
        print("edgepipe-cloud: the passwords do not match", file=sys.stderr)
        return None
    return first


def _users(args: argparse.Namespace, settings: Settings) -> int:
    from ._auth import hash_password

    with open_backend(settings.db) as backend:
        if args.action == "add":
            if not _NAME.fullmatch(args.name):
                print(
                    "edgepipe-cloud: user names are 1-64 chars of letters, digits, '.', '_', '-'",
                    file=sys.stderr,
                )
                return 2
            password = _read_password(args.password_stdin)
            if password is None:
                return 1
            if len(password) < 8:
                print("edgepipe-cloud: the password must be at least 8 characters", file=sys.stderr)
                return 2
            try:
                backend.add_operator(args.name, hash_password(password))
            except OperatorExists as exc:
                print(f"edgepipe-cloud: {exc}", file=sys.stderr)
                return 1
            print(f"operator {args.name!r} added", file=sys.stderr)
        elif args.action == "list":
            for op in backend.list_operators():
                print(json.dumps(op, sort_keys=True))
        elif args.action == "remove":
            if not backend.remove_operator(args.name):
                print(f"edgepipe-cloud: no operator named {args.name!r}", file=sys.stderr)
                return 1
            print(f"operator {args.name!r} removed and signed out", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            settings = Settings.from_env(
                db=args.db,
                host=args.host,
                port=args.port,
                max_body_mb=args.max_body_mb,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
            )
            return _serve(settings, args.log_level)
        if args.command == "users":
            return _users(args, Settings.from_env(db=args.db))
        return _devices(args, Settings.from_env(db=args.db))
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        print(f"edgepipe-cloud: invalid settings: {errors}", file=sys.stderr)
        return 2
    except (CloudError, OSError) as exc:
        print(f"edgepipe-cloud: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
