"""The floor under the edge budgets: what the fixed dependencies cost before edgepipe does
anything.

    python -m bench.floor [--runs 7]

A fresh interpreter imports what the edge process must (asyncio, paho-mqtt, aiosqlite,
cryptography's AES-GCM, msgpack, pydantic with one model validated, PyYAML, wasmtime with one
module instantiated from the AOT form and called) and reports its RSS and the time to get
there.  Compare with ``python -m bench.e2e``'s cold start and idle RSS: what edgepipe adds
on top is the difference.  Medians of ``--runs`` processes; writes bench/results/floor.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

_PROBE = r"""
import sys, time
t0 = time.perf_counter()
import asyncio, aiosqlite, msgpack, yaml
import paho.mqtt.client
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel
import wasmtime

engine = wasmtime.Engine()
module = wasmtime.Module.deserialize_file(engine, sys.argv[1])
store = wasmtime.Store(engine)
instance = wasmtime.Instance(store, module, [])
instance.exports(store)["f"](store)
AESGCM(bytes(32)).encrypt(bytes(12), b"reading", None)


class Reading(BaseModel):
    device: str
    value: float


Reading(device="d", value=1.0)
t1 = time.perf_counter()
rss = next(x for x in open("/proc/self/status") if x.startswith("VmRSS")).split()[1]
print(f"{(t1 - t0) * 1000:.1f} {int(rss) / 1024:.1f}", flush=True)
"""

_WAT = '(module (memory (export "memory") 1) (func (export "f") (result i32) i32.const 1))'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args(argv)
    import wasmtime

    with tempfile.TemporaryDirectory(prefix="edgepipe-floor-") as tmp:
        cwasm = Path(tmp) / "f.cwasm"
        cwasm.write_bytes(wasmtime.Module(wasmtime.Engine(), _WAT).serialize())
        wall, inproc, rss = [], [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", _PROBE, str(cwasm)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            wall.append((time.perf_counter() - t0) * 1000)
            inproc.append(float(out[0]))
            rss.append(float(out[1]))
    res = {
        "runs": args.runs,
        "exec_to_exit_ms": statistics.median(wall),
        "imports_and_instance_ms": statistics.median(inproc),
        "rss_mb": statistics.median(rss),
    }
    print(
        f"fixed dependencies imported, one Wasm instance called (median of {args.runs}): "
        f"{res['imports_and_instance_ms']:.0f} ms in-process, {res['exec_to_exit_ms']:.0f} ms "
        f"exec to exit, RSS {res['rss_mb']:.1f} MB"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "floor.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"written to {RESULTS / 'floor.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
