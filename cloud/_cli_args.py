"""The ``edgepipe-cloud`` command line: its parser, the global options and where each of
their values comes from.

Global options (``--db``, ``--master-key-file``) are accepted at every level, before or after
the command and its subcommand; given more than once, the last one wins.  ``--help`` shows the
value each would have now and its source.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._bundle_cli import add_desire_parser, add_parsers
from ._rollout_cli import add_label_parsers, add_rollout_parser
from ._settings import ENV_PREFIX, Settings
from ._url import redacted_url

__all__ = [
    "DB_ENV",
    "DEFAULT_DB",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "Source",
    "db_source",
    "key_source",
    "parser",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DB_ENV = ENV_PREFIX + "DB"
KEY_FILE_ENV = ENV_PREFIX + "MASTER_KEY_FILE"
KEY_ENV = ENV_PREFIX + "MASTER_KEY"
DEFAULT_DB: str = Settings.model_fields["db"].default

_EXITS = """\
exit status:
  0  done
  1  the command failed: {failed}
  2  usage or configuration error: a bad option or argument, an invalid setting{usage}"""

_NO_DB = ", no database at the URL given (nothing is created)"
_KEY = ", a master key missing, wrong or readable by others"


@dataclass(frozen=True)
class Source:
    """A global option's value (None: not set) and where it comes from."""

    value: str | None
    origin: str
    #: What the default means here (the file in the current directory), when it is one.
    detail: str = ""

    def describe(self) -> str:
        origin = f"{self.origin}: {self.detail}" if self.detail else self.origin
        return f"{redacted_url(self.value)} (from {origin})" if self.value else origin


def db_source(given: str | None, environ: Mapping[str, str] | None = None) -> Source:
    """``--db``, else ``$EDGEPIPE_CLOUD_DB``, else the default (a file in the current
    directory)."""
    env = os.environ if environ is None else environ
    if given:
        return Source(given, "--db")
    if env.get(DB_ENV):
        return Source(env[DB_ENV], f"${DB_ENV}")
    return Source(DEFAULT_DB, "the default", os.path.abspath(DEFAULT_DB.removeprefix("sqlite:///")))


def key_source(given: str | None, environ: Mapping[str, str] | None = None) -> Source:
    """``--master-key-file``, else ``$EDGEPIPE_CLOUD_MASTER_KEY_FILE``, else the key lines in
    ``$EDGEPIPE_CLOUD_MASTER_KEY`` (never shown), else none."""
    env = os.environ if environ is None else environ
    if given:
        return Source(given, "--master-key-file")
    if env.get(KEY_FILE_ENV):
        return Source(env[KEY_FILE_ENV], f"${KEY_FILE_ENV}")
    if env.get(KEY_ENV):
        return Source(None, f"the key lines in ${KEY_ENV}")
    return Source(None, "none configured")


def _given(argv: Sequence[str]) -> argparse.Namespace:
    """The global options on this command line, wherever they are (for ``--help``)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--db")
    p.add_argument("--master-key-file")
    try:
        return p.parse_known_args(list(argv))[0]
    except argparse.ArgumentError:
        return argparse.Namespace(db=None, master_key_file=None)


def _pct(text: str) -> str:
    return text.replace("%", "%%")


def _globals(argv: Sequence[str]) -> argparse.ArgumentParser:
    given = _given(argv)
    db, key = db_source(given.db), key_source(given.master_key_file)
    g = argparse.ArgumentParser(add_help=False)
    grp = g.add_argument_group("global options (before or after any command)")
    grp.add_argument(
        "--db",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="the receiver's database: sqlite:///relative.db, sqlite:////absolute.db or "
        f"postgresql://user@host:5432/db[?schema=name]; else ${DB_ENV}, else {DEFAULT_DB} "
        f"(in the current directory). Now: {_pct(db.describe())}",
    )
    grp.add_argument(
        "--master-key-file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="file (mode 0600) with the master key that seals device secrets; else "
        f"${KEY_FILE_ENV}, else the key lines in ${KEY_ENV}. Now: {_pct(key.describe())}",
    )
    return g


def parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The whole command line; ``argv`` only feeds the "Now:" lines of ``--help``."""
    g = _globals(argv)
    fmt = argparse.RawDescriptionHelpFormatter

    def exits(failed: str, usage: str = "") -> str:
        head, *codes = _EXITS.format(failed=failed, usage=usage).splitlines()
        wrap = [
            textwrap.fill(c, 78, subsequent_indent=" " * 5, break_on_hyphens=False) for c in codes
        ]
        return "\n".join([head, *wrap])

    db_cmd = "the database cannot be opened"
    p = argparse.ArgumentParser(
        prog="edgepipe-cloud",
        description="\n\n".join(
            textwrap.fill(para, 78, break_on_hyphens=False)
            for para in (
                "edgepipe cloud receiver: serve uploads and the dashboard, manage device "
                "credentials and dashboard operators.",
                "Every command except 'serve', 'init' and 'master-key generate' works on an "
                f"existing database: --db URL, else ${DB_ENV}, else {DEFAULT_DB} (in the "
                "current directory); 'init' (or the first 'serve') creates it. Global options "
                "go before or after any command.",
            )
        ),
        epilog=exits(db_cmd, _NO_DB + _KEY),
        formatter_class=fmt,
        parents=[g],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent: Any, name: str, help: str, epilog: str) -> argparse.ArgumentParser:
        return parent.add_parser(
            name,
            help=help,
            description=help,
            epilog=epilog,
            formatter_class=fmt,
            parents=[g],
        )

    serve = command(
        sub,
        "serve",
        "run the receiver and dashboard (uvicorn); creates the database if it does not exist",
        exits(f"{db_cmd}, or the address is in use", _KEY),
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--max-body-mb", type=float, help="largest upload body (default 8)")
    serve.add_argument("--tls-cert", help="certificate chain (PEM); with --tls-key")
    serve.add_argument("--tls-key", help="its private key (PEM)")
    serve.add_argument(
        "--alerts", metavar="FILE", help="alert rules and webhooks (YAML, docs/alerts.md)"
    )
    serve.add_argument("--log-level", default="info")

    command(
        sub,
        "init",
        "create the database (or bring an existing one up to date)",
        exits(db_cmd, _KEY),
    )

    devices = command(sub, "devices", "manage device credentials", exits(db_cmd, _NO_DB + _KEY))
    dsub = devices.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = command(
        dsub,
        "add",
        "register a device and print its secret once (needs the master key)",
        exits(f"a device of that name exists; {db_cmd}", ", an invalid name" + _NO_DB + _KEY),
    )
    add.add_argument("name")
    add_label_parsers(dsub, add, command, exits, db_cmd, _NO_DB)
    command(
        dsub,
        "list",
        "list devices and their sync status (JSON lines)",
        exits(db_cmd, _NO_DB),
    )
    add_desire_parser(dsub, command, exits, db_cmd, _NO_DB)
    rm = command(
        dsub,
        "remove",
        "remove a device and everything stored for it",
        exits(f"no device of that name; {db_cmd}", _NO_DB),
    )
    rm.add_argument("name")

    users = command(sub, "users", "manage dashboard operators", exits(db_cmd, _NO_DB))
    usub = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    uadd = command(
        usub,
        "add",
        "add an operator (password hashed with argon2id); prompts for the password twice",
        exits(
            f"an operator of that name exists, the passwords differ; {db_cmd}",
            ", an invalid name, a password shorter than 8 characters" + _NO_DB,
        ),
    )
    uadd.add_argument("name")
    uadd.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (one line)"
    )
    command(usub, "list", "list operators (JSON lines)", exits(db_cmd, _NO_DB))
    urm = command(
        usub,
        "remove",
        "remove an operator and end their sessions",
        exits(f"no operator of that name; {db_cmd}", _NO_DB),
    )
    urm.add_argument("name")

    add_parsers(sub, command, exits, db_cmd, _NO_DB)
    add_rollout_parser(sub, command, exits, db_cmd, _NO_DB)

    mkey = command(
        sub,
        "master-key",
        "the key that seals device secrets at rest",
        exits("see the actions", _NO_DB + _KEY),
    )
    mksub = mkey.add_subparsers(dest="action", required=True, metavar="ACTION")
    gen = command(
        mksub,
        "generate",
        "make a new master key line (no database involved)",
        exits("the file exists (it is never overwritten) or cannot be written"),
    )
    gen.add_argument("--out", help="write it to this new file (mode 0600) instead of stdout")
    rot = command(
        mksub,
        "rotate",
        "add a new key line to the master key file and re-seal every device secret",
        exits(db_cmd, _NO_DB + _KEY + ", a key edgepipe-cloud cannot change without --keep-key"),
    )
    rot.add_argument(
        "--keep-key",
        action="store_true",
        help="do not add a key line: re-seal with the last line as configured (use this when "
        "the key comes from the environment or a read-only Secret)",
    )
    return p
