"""``edgepipe validate``: everything ``run`` and ``deploy`` would refuse, nothing started."""

from __future__ import annotations

import argparse
import logging
import sys

from . import add_config_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check a pipeline.yaml, the secrets and files it names (store key, device "
        "secret, broker password and TLS files) and its filter chain (modules, ABI, config, "
        "ep_init) without starting, connecting or writing anything; exit 0 valid, 2 invalid",
    )
    add_config_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    p.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from config._loader import load_config
    from config._secrets import check_secrets
    from core._errors import ConfigError
    from pipeline._compose import chain_spec
    from pipeline.chain._deploy import check_chain

    cfg = load_config(args.config)
    problems: list[ConfigError] = []
    try:
        check_secrets(cfg)
    except ConfigError as e:
        problems.append(e)
    # what stages log while they are checked (a module without a config declaration, a
    # guest explaining a refusal) is printed once they are: not when the refusal says it
    logs = _Collect()
    logger = logging.getLogger("edgepipe")
    logger.addHandler(logs)
    level, logger.level = logger.level, logging.WARNING
    try:
        spec = chain_spec(cfg)
        # no AOT cache: validating writes nothing, not even next to the store
        check_chain(spec, cache_dir=None)
    except ConfigError as e:
        problems.append(e)
    finally:
        logger.removeHandler(logs)
        logger.level = level
    refusal = "\n".join(str(e) for e in problems)
    for record in logs.records:
        said = record.getMessage()
        guest = said.split(": ", 1)[-1]
        if record.levelno >= logging.ERROR and guest in refusal:
            continue  # the refusal below quotes it
        print(f"edgepipe: {record.levelname.lower()}: {said}", file=sys.stderr)
    if problems:
        # one error, located problems in file order (a chain file's come after)
        first, *rest = problems
        raise ConfigError(
            first.message + "".join(f"\n{e}" for e in rest),
            path=first.path,
            line=first.line,
            col=first.col,
        )
    if not args.quiet:
        where = f" in {spec.path}" if spec.path is not None else ""
        print(
            f"{args.config}: ok ({len(cfg.subscriptions)} subscription(s), "
            f"{len(spec.stages)} filter stage(s){where}, device {cfg.device.id!r})"
        )
    return 0


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
