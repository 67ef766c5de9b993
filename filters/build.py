"""Rebuild every filter module in filters/lib reproducibly: ``python filters/build.py``.

Each ``lib/<name>.c`` (with sdk/edgepipe.h) or ``lib/<name>.zig`` (with sdk/edgepipe.zig)
becomes ``lib/<name>.wasm`` with the pinned toolchain ``python -m ziglang`` and the same
fixed flags ``edgepipe filter build`` uses (no timestamps, no absolute paths, no debug
info), so a rebuild is byte-for-byte identical.  ``lib/<name>.rs`` (with sdk/rust) is
built with Debian's wasm32 rustc (``apt-get install rustc libstd-rust-dev-wasm32
lld-14``); without it the Rust modules are skipped with a message.  ``--check`` rebuilds into a temporary
directory and fails if any committed module differs from its source.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from pipeline.cli._filter import RUST_PACKAGES, compile_filter, find_rustc

HERE = Path(__file__).resolve().parent
SDK = HERE / "sdk"
LIB = HERE / "lib"


def sources() -> list[Path]:
    return sorted(p for p in LIB.iterdir() if p.suffix in (".c", ".zig", ".rs"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify committed modules are current")
    ap.add_argument("names", nargs="*", help="only these filters (default: all)")
    args = ap.parse_args(argv)
    srcs = [s for s in sources() if not args.names or s.stem in args.names]
    rust = [s for s in srcs if s.suffix == ".rs"]
    if rust and find_rustc() is None:
        print(
            f"skipping {', '.join(s.name for s in rust)}: no wasm32 rustc "
            f"(apt-get install {' '.join(RUST_PACKAGES)})",
            file=sys.stderr,
        )
        srcs = [s for s in srcs if s.suffix != ".rs"]
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            stale = []
            for src in srcs:
                out = Path(tmp) / f"{src.stem}.wasm"
                compile_filter(src, out, sdk=SDK, werror=True)
                committed = LIB / f"{src.stem}.wasm"
                if not committed.exists() or not filecmp.cmp(out, committed, shallow=False):
                    stale.append(committed.name)
        if stale:
            print("out of date (run python filters/build.py):", ", ".join(stale), file=sys.stderr)
            return 1
        print(f"{len(srcs)} modules up to date")
        return 0
    for src in srcs:
        out = LIB / f"{src.stem}.wasm"
        compile_filter(src, out, sdk=SDK, werror=True)
        print(f"lib/{out.name}  {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
