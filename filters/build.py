"""Rebuild every filter module in filters/lib reproducibly: ``python filters/build.py``.

Each ``lib/<name>.c`` (with sdk/edgepipe.h) or ``lib/<name>.zig`` (with sdk/edgepipe.zig)
becomes ``lib/<name>.wasm`` using the pinned toolchain ``python -m ziglang``.  Builds are
byte-for-byte reproducible: fixed flags, no timestamps, paths relative to filters/.
``--check`` rebuilds into a temporary directory and fails if any committed .wasm differs.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SDK = HERE / "sdk"
LIB = HERE / "lib"

C_FLAGS = [
    "--target=wasm32-freestanding",
    "-nostdlib",
    "-O2",
    "-ffile-prefix-map={root}=.",
    "-Wall",
    "-Wextra",
    "-Wno-unused-function",
    "-Wno-unused-parameter",
    "-Werror",
    "-Wl,--no-entry",
    "-Wl,--export-dynamic",
    "-Wl,--strip-debug",
    "-Wl,-z,stack-size=65536",
]


def build_c(src: Path, out: Path) -> None:
    flags = [f.format(root=src.parent) for f in C_FLAGS]
    cmd = [sys.executable, "-m", "ziglang", "cc", *flags, "-I", str(SDK), str(src), "-o", str(out)]
    _run(cmd, src.parent)


def build_zig(src: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "ziglang",
            "build-exe",
            "-target",
            "wasm32-freestanding",
            "-O",
            "ReleaseSmall",
            "-fno-entry",
            "-rdynamic",
            "-fstrip",
            "--dep",
            "edgepipe",
            f"-Mroot={src}",
            f"-Medgepipe={SDK / 'edgepipe.zig'}",
            "--cache-dir",
            str(Path(tmp) / "cache"),
            "--global-cache-dir",
            str(Path(tmp) / "global"),
            f"-femit-bin={out}",
        ]
        _run(cmd, src.parent)


def build(src: Path, out: Path) -> None:
    """Compile one filter source (.c or .zig) into a .wasm module."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".c":
        build_c(src, out)
    elif src.suffix == ".zig":
        build_zig(src, out)
    else:
        raise SystemExit(f"{src}: not a .c or .zig filter source")


def _run(cmd: list[str], cwd: Path) -> None:
    env = dict(
        os.environ,
        SOURCE_DATE_EPOCH="0",
        ZIG_GLOBAL_CACHE_DIR=os.environ.get("ZIG_GLOBAL_CACHE_DIR", ""),
    )
    if not env["ZIG_GLOBAL_CACHE_DIR"]:
        del env["ZIG_GLOBAL_CACHE_DIR"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"build failed: {' '.join(cmd)}\n{proc.stderr}")


def sources() -> list[Path]:
    return sorted(p for p in LIB.iterdir() if p.suffix in (".c", ".zig"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify committed modules are up to date")
    ap.add_argument("names", nargs="*", help="only these filters (default: all)")
    args = ap.parse_args(argv)
    srcs = [s for s in sources() if not args.names or s.stem in args.names]
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            stale = []
            for src in srcs:
                out = Path(tmp) / f"{src.stem}.wasm"
                build(src, out)
                committed = LIB / f"{src.stem}.wasm"
                if not committed.exists() or not filecmp.cmp(out, committed, shallow=False):
                    stale.append(committed.name)
            if stale:
                print("out of date:", ", ".join(stale), file=sys.stderr)
                return 1
            print(f"{len(srcs)} modules up to date")
            return 0
    for src in srcs:
        out = LIB / f"{src.stem}.wasm"
        build(src, out)
        print(f"{out.relative_to(HERE)}  {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
