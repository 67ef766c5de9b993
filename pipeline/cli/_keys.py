"""``edgepipe keys``: generate a keyring, rotate it, re-encrypt the store under the new key.

Key material is only ever written to the keyring file (mode 0600) or, for ``generate``
without ``-o``, to standard output on request; messages name key *ids*, never keys.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import add_config_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="store keys: generate, rotate, list, reencrypt")
    ks = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    g = ks.add_parser("generate", help="make a new keyring (one key); refuses to overwrite")
    g.add_argument("-o", "--output", metavar="FILE", help="write here (mode 0600), not stdout")
    g.add_argument("--id", help="key id (default: random 'k' + 8 hex digits)")
    g.set_defaults(func=_generate)

    r = ks.add_parser("rotate", help="append a new active key; older rows stay readable")
    r.add_argument("file", metavar="FILE", help="the keyring file")
    r.add_argument("--id", help="id of the new key (default: random)")
    r.set_defaults(func=_rotate)

    ls = ks.add_parser("list", help="the key ids of a keyring file (never the keys)")
    ls.add_argument("file", metavar="FILE")
    ls.set_defaults(func=_list)

    re = ks.add_parser(
        "reencrypt",
        help="re-seal every row under the active key (safe to interrupt; rerun resumes)",
    )
    add_config_arg(re)
    re.add_argument("--chunk", type=int, default=64, help="rows per transaction (default 64)")
    re.add_argument("--progress", action="store_true", help="progress on stderr even if no tty")
    re.set_defaults(func=_reencrypt)


def _fail(msg: str) -> int:
    print(f"edgepipe keys: {msg}", file=sys.stderr)
    return 1


def _generate(args: argparse.Namespace) -> int:
    from protocol._keys import write_new_key_file
    from storage import generate_key_line

    line = generate_key_line(args.id) + "\n"
    if not args.output:
        sys.stdout.write(line)
        return 0
    path = Path(args.output)
    try:
        write_new_key_file(path, line)
    except FileExistsError:
        return _fail(f"{path} exists; refusing to overwrite a keyring (use 'keys rotate')")
    except OSError as e:
        return _fail(f"cannot create {path}: {e.strerror}")
    print(f"wrote {path} (mode 0600), key id {line.split()[0]}", file=sys.stderr)
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from protocol._keys import append_key_line
    from storage import Keyring, generate_key_line

    path = Path(args.file)
    if path.is_symlink():
        return _fail(
            f"{path} is a link (a Kubernetes Secret mount?): rotate a local copy with "
            "'edgepipe keys rotate', then update the Secret from it"
        )
    ring = Keyring.from_file(path)  # checks the mode and the format; raises KeyError_
    if args.id and args.id in ring.ids:
        return _fail(f"key id {args.id!r} is already in {path}")
    line = generate_key_line(args.id)
    while line.split()[0] in ring.ids:
        line = generate_key_line()
    try:
        append_key_line(path, line)
    except OSError as e:
        return _fail(f"cannot rewrite {path}: {e.strerror}")
    new_id = line.split()[0]
    print(
        f"{path}: new active key {new_id!r} (older: {', '.join(ring.ids)}). Restart edgepipe "
        "to use it; rows are re-encrypted in the background, or run 'edgepipe keys reencrypt'.",
        file=sys.stderr,
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    from storage import Keyring

    ring = Keyring.from_file(args.file)
    for kid in ring.ids:
        print(f"{kid}{'  (active)' if kid == ring.active_id else ''}")
    return 0


def _reencrypt(args: argparse.Namespace) -> int:
    import asyncio

    from config._loader import load_config
    from core._progress import Progress

    from .._compose import open_store

    cfg = load_config(args.config)

    async def go() -> int:
        async with await open_store(cfg, create=False) as store:
            bar = Progress(
                0,
                quiet=not (args.progress or sys.stderr.isatty()),
                bar=True,
                label="re-encrypting",
                unit="rows",
                verb="re-encrypted",
            )
            n = await store.reencrypt(chunk=max(1, args.chunk), progress=bar)
            bar.finish()
            by_key = await store.rows_by_key()
        active = store.sealer.keyring.active_id
        left = {k: v for k, v in by_key.items() if k != active}
        if left:
            return _fail(f"re-encrypted {n} row(s), but rows remain under {sorted(left)}")
        print(
            f"re-encrypted {n} row(s); all {sum(by_key.values())} row(s) are under key "
            f"{active!r}. Older keys can now be removed from the keyring.",
            file=sys.stderr,
        )
        return 0

    return asyncio.run(go())
