from __future__ import annotations

import argparse

from . import add_config_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sync",
        help="upload the backlog to the cloud receiver now (exit 0 when drained)",
        description="Upload every unsynced batch to the receiver in sync.url, oldest first. "
        "Exit 0 when the backlog is drained, 1 when the receiver is unreachable or refuses, "
        "or when data must wait (metered link policy, budget).",
    )
    add_config_arg(p)
    p.add_argument("--now", action="store_true", help="drain now (the only mode; for clarity)")
    p.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep retrying (backoff, link watching) until SECONDS pass without progress",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(func=_sync)


def _sync(args: argparse.Namespace) -> int:
    import asyncio

    from sync._cli import drain_now

    from .._loader import load_config

    cfg = load_config(args.config)

    return asyncio.run(drain_now(cfg, retry_for=args.wait, quiet=args.quiet))
