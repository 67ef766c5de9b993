"""The ``edgepipe`` command line.

Each subcommand is one module ``pipeline/cli/_<name>.py`` exposing
``add_parser(sub)``, which builds its parser and sets ``func=handler`` where
``handler(args) -> int`` returns the exit code.  Adding a subcommand is: write the module,
add its name to :data:`COMMANDS`.  Heavy imports happen inside handlers, so ``--help``
and every command start fast.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .._errors import EdgepipeError

__all__ = ["COMMANDS", "main", "write_output"]

COMMANDS = (
    "run",
    "validate",
    "schema",
    "demo",
    "sync",
    "filter",
    "deploy",
    "keys",
    "export",
    "status",
    "metrics",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepipe",
        description="Edge IoT stream processing: MQTT in, sandboxed Wasm filters, "
        "encrypted local store, batched cloud sync.",
    )
    parser.add_argument("--version", action="version", version=f"edgepipe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"._{name}", __name__).add_parser(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edgepipe")
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except EdgepipeError as e:
        print(f"edgepipe: {e}", file=sys.stderr)
        return 2 if isinstance(e, _config_errors()) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def write_output(text: str, output: str | None) -> None:
    """``text`` to the file ``-o/--output`` names, or to stdout."""
    if output:
        with open(output, "w") as f:
            f.write(text)
    else:
        print(text, end="")


def _config_errors() -> tuple[type[BaseException], ...]:
    from .._errors import ConfigError

    return (ConfigError,)


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        default="pipeline.yaml",
        metavar="PATH",
        help="pipeline configuration (default: ./pipeline.yaml)",
    )
