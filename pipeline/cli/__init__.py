"""The ``edgepipe`` command line.

Each subcommand is one module ``pipeline/cli/_<name>.py`` exposing
``add_parser(sub)``, which builds its parser and sets ``func=handler`` where
``handler(args) -> int`` returns the exit code.  Adding a subcommand is: write the module,
add its name to :data:`COMMANDS`.  A command imports only its own module, and heavy
imports happen inside handlers, so every command starts fast.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from core._errors import EdgepipeError

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


#: subcommands that live in another subcommand's module
_MODULE_OF = {"rollback": "deploy"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's (what a start-up needs: importing
    every subcommand module costs tens of milliseconds on a small device)."""
    parser = argparse.ArgumentParser(
        prog="edgepipe",
        description="Edge IoT stream processing: MQTT in, sandboxed Wasm filters, "
        "encrypted local store, batched cloud sync.",
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f"._{name}", __name__).add_parser(sub)
    return parser


class _Version(argparse.Action):
    """``--version``, looked up only when asked for (the package metadata costs start-up)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"edgepipe {_version()}")
        parser.exit()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edgepipe")
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = _MODULE_OF.get(argv[0], argv[0]) if argv else None
    parser = build_parser(first if first in COMMANDS else None)
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
    from core._errors import ConfigError

    return (ConfigError,)


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        default="pipeline.yaml",
        metavar="PATH",
        help="pipeline configuration (default: ./pipeline.yaml)",
    )
