from __future__ import annotations

import argparse

from . import add_config_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a pipeline.yaml and exit (0 valid, 2 invalid)")
    add_config_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    p.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    from config._loader import load_config

    cfg = load_config(args.config)
    if not args.quiet:
        print(
            f"{args.config}: ok ({len(cfg.subscriptions)} subscription(s), "
            f"{len(cfg.chain)} filter stage(s), device {cfg.device.id!r})"
        )
    return 0
