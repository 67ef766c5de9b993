"""Compiled Wasm code across CPU models, run by .ci/arm64.sh under qemu-user.

Each call runs under the CPU model its ``QEMU_CPU`` names (qemu-user reads it at exec):

    python .ci/arm64_aot.py compile FILE   # serialize validity.wasm's machine code to FILE
    python .ci/arm64_aot.py load FILE      # "loaded" or "refused: <wasmtime's reason>"
    python .ci/arm64_aot.py cache DIR      # through the AOT cache: "<hits> <misses> <target>"
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import wasmtime

from pipeline.chain._engine import engine, engine_settings
from pipeline.wasm._aot import ModuleCache, host_target

WASM = Path(__file__).resolve().parents[1] / "filters" / "lib" / "validity.wasm"


def main(mode: str, path: str) -> int:
    data = WASM.read_bytes()
    if mode == "compile":
        Path(path).write_bytes(bytes(wasmtime.Module(engine(), data).serialize()))
        print(host_target())
    elif mode == "load":
        try:
            wasmtime.Module.deserialize(engine(), Path(path).read_bytes())
            print("loaded")
        except wasmtime.WasmtimeError as e:
            print("refused:", str(e).splitlines()[0])
    elif mode == "cache":
        cache = ModuleCache(Path(path), engine(), engine_settings())
        cache.load(data, hashlib.sha256(data).hexdigest())
        print(cache.hits, cache.misses, host_target())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
