"""Rebuild the ingest kernel reproducibly: ``python pipeline/ingest/kernel/build.py``.

``ingest.c`` becomes ``ingest.wasm`` (committed beside it) with the pinned toolchain
``python -m ziglang`` (the ``filters`` extra) and the fixed flags ``edgepipe filter build``
uses for C (no timestamps, no absolute paths, no debug info), so a rebuild is
byte-for-byte identical.  ``--check`` rebuilds into a temporary directory and fails if
the committed module differs from its source.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "ingest.c"
MODULE = HERE / "ingest.wasm"


def build(out: Path) -> None:
    from pipeline.cli._filter import C_FLAGS

    cmd = [
        sys.executable,
        "-m",
        "ziglang",
        "cc",
        *C_FLAGS,
        "-Werror",
        f"-ffile-prefix-map={HERE}=.",
        str(SOURCE),
        "-o",
        str(out),
    ]
    env = dict(os.environ, SOURCE_DATE_EPOCH="0")
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"building {SOURCE.name} failed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify ingest.wasm is current")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / MODULE.name
            build(out)
            if not MODULE.exists() or out.read_bytes() != MODULE.read_bytes():
                print(f"{MODULE.name} out of date (run python {__file__})", file=sys.stderr)
                return 1
        print(f"{MODULE.name} up to date")
        return 0
    build(MODULE)
    print(f"{MODULE.name}  {MODULE.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
