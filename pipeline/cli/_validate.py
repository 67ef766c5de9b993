"""``edgepipe validate``: everything ``run`` and ``deploy`` would refuse, nothing started."""

from __future__ import annotations

import argparse

from . import add_config_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check a pipeline.yaml and its filter chain (modules, ABI, config, ep_init) "
        "without starting anything; exit 0 valid, 2 invalid",
    )
    add_config_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    p.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    import logging
    import os

    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from config._loader import load_config
    from pipeline.chain._deploy import check_chain, load_chain

    # warnings (a module without a config declaration) go to stderr as they happen
    logging.basicConfig(level=logging.WARNING, format="edgepipe: warning: %(message)s")
    cfg = load_config(args.config)
    spec = load_chain(cfg)
    # no AOT cache: validating writes nothing, not even next to the store
    check_chain(spec, cache_dir=None)
    if not args.quiet:
        where = f" in {spec.path}" if spec.path is not None else ""
        print(
            f"{args.config}: ok ({len(cfg.subscriptions)} subscription(s), "
            f"{len(spec.stages)} filter stage(s){where}, device {cfg.device.id!r})"
        )
    return 0
