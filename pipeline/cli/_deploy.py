"""``edgepipe deploy`` and ``edgepipe rollback``: install a filters file for hot swap."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import add_config_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="validate and compile a filters file, then atomically install it as the "
        "running pipeline's chain_file (hot-swapped by the runtime)",
    )
    p.add_argument("filters", type=Path, help="filters file (version: 1, chain: [...])")
    add_config_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_deploy)

    r = sub.add_parser("rollback", help="re-install an earlier deployed filters file")
    add_config_arg(r)
    r.add_argument("--to", type=int, metavar="N", help="version number (default: previous)")
    r.add_argument("--list", action="store_true", help="list deployed versions and exit")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(func=_rollback)


def _deploy(args: argparse.Namespace) -> int:
    from config._loader import load_config
    from pipeline import _compose as compose
    from pipeline.chain._deploy import deploy

    cfg = load_config(args.config)
    result = deploy(compose.chain_target(cfg), args.filters, cache_dir=compose.cache_dir(cfg))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"deployed {args.filters} as version {result['version']} -> {result['installed']}")
        for st in result["stages"]:
            print(f"  {st['name']:<20} {st['kind']:<10} {st['sha256'][:16]}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from config._loader import load_config
    from pipeline import _compose as compose
    from pipeline.chain._deploy import history, rollback

    cfg = load_config(args.config)
    target = compose.chain_target(cfg)
    if args.list:
        entries, current = history(target)
        for e in entries:
            n = int(e.stem)
            print(f"{'*' if n == current else ' '} {n:6d}  {e}")
        return 0
    result = rollback(target, args.to)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"rolled back to version {result['version']} -> {result['installed']}")
    return 0
