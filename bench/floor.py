"""The floor under the edge budgets: what the fixed dependencies cost before edgepipe does
anything.

    python -m bench.floor [--runs 7]
    python -m bench.floor --steps [--runs 5]

A fresh interpreter imports what the edge process must (asyncio, paho-mqtt, aiosqlite,
cryptography's AES-GCM, msgpack, pydantic with one model validated, PyYAML, wasmtime with one
module instantiated from the AOT form and called) and reports its RSS and the time to get
there.  Compare with ``python -m bench.e2e``'s cold start and idle RSS: what edgepipe adds
on top is the difference.  Medians of ``--runs`` processes; writes bench/results/floor.json.

``--steps`` is where the edge process's memory goes: a fresh interpreter takes the steps of
``edgepipe run`` one by one -- the interpreter, the CLI and what ``edgepipe run`` sets
first (one malloc arena, pydantic's plugin loader stood in for), asyncio, paho-mqtt, pydantic and the config
models, cryptography's AES-GCM and the key format, the store's modules (aiosqlite, msgpack,
zstandard), wasmtime imported, its engine, the example's 3-stage chain built from the AOT
cache, the ingest and runtime modules, the store opened -- and reports VmRSS (anonymous and
file-backed) after each; medians of ``--runs`` processes.  Writes
bench/results/floor-steps.json.
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

_STEPS = r"""
import sys

def rss(step):
    f = dict(x.split(":", 1) for x in open("/proc/self/status") if x.startswith(("Vm", "Rss")))
    kb = [int(f[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")]
    print(step + "|" + " ".join(str(v) for v in kb), flush=True)

rss("interpreter")
import os
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
import pipeline.cli._run as run
run._one_malloc_arena()
run._no_pydantic_plugin_loader()
rss("CLI, one malloc arena, no plugin loader")
import asyncio
rss("asyncio")
import paho.mqtt.client
rss("paho-mqtt")
import config._models
rss("pydantic and the config models")
import protocol._keys
rss("cryptography AES-GCM, key format")
import storage
import zstandard
rss("store modules (aiosqlite, sqlite3, msgpack, zstandard)")
import wasmtime
rss("wasmtime imported")
from pipeline.chain._engine import engine
engine()
rss("wasmtime engine")
from pathlib import Path
import yaml
from config._models import StageConfig
from core._model import SeriesRegistry
from pipeline.chain._chain import Chain
repo, work = Path(sys.argv[1]), Path(sys.argv[2])
stages = [dict(s, module=str(repo / s["module"])) for s in
          yaml.safe_load((repo / "pipeline.yaml").read_text())["chain"]]
chain = Chain.build([StageConfig.model_validate(s) for s in stages], SeriesRegistry(),
                    base_dir=repo, cache_dir=work / "cache")
rss("the example's 3 stages (AOT cache)")
import pipeline._compose, pipeline._runtime, pipeline.ingest._mqtt, pipeline.ingest._decoder
rss("ingest, runtime and composition modules")
from storage import Keyring, Store
from protocol._keys import generate_key_line
(work / "k").write_text(generate_key_line() + "\n")
(work / "k").chmod(0o600)
for old in work.glob("s.db*"):  # the store of an earlier run, under its own key
    old.unlink()
async def open_store():
    s = await Store.open(work / "s.db", Keyring.from_file(work / "k"), device_id="d")
    rss("store opened")
    await s.close()
asyncio.run(open_store())
"""

_WAT = '(module (memory (export "memory") 1) (func (export "f") (result i32) i32.const 1))'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--steps", action="store_true", help="VmRSS after each step of a start")
    args = ap.parse_args(argv)
    if args.steps:
        return _steps(args.runs)
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


def _steps(runs: int) -> int:
    samples: dict[str, list[list[int]]] = {}
    with tempfile.TemporaryDirectory(prefix="edgepipe-floor-") as tmp:
        for i in range(runs + 1):  # the first run fills the AOT cache, and is not counted
            out = subprocess.run(
                [sys.executable, "-c", _STEPS, str(REPO), tmp],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            if out.returncode:
                raise RuntimeError(f"the probe failed: {out.stderr[-800:]}")
            for line in out.stdout.splitlines() if i else []:
                step, _, kb = line.partition("|")
                samples.setdefault(step, []).append([int(x) for x in kb.split()])
    steps = [
        {
            "step": step,
            **{
                k + "_mb": statistics.median(v[j] for v in vs) / 1024
                for j, k in enumerate(("vmrss", "rssanon", "rssfile"))
            },
        }
        for step, vs in samples.items()
    ]
    print(f"VmRSS after each step of an edge start (median of {runs}), MB")
    print(f"{'':56}{'VmRSS':>8}{'+':>7}{'anon':>7}{'file':>7}")
    prev = 0.0
    for st in steps:
        print(
            f"{st['step']:56}{st['vmrss_mb']:>8.1f}{st['vmrss_mb'] - prev:>+7.1f}"
            f"{st['rssanon_mb']:>7.1f}{st['rssfile_mb']:>7.1f}"
        )
        prev = st["vmrss_mb"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "floor-steps.json").write_text(json.dumps({"runs": runs, "steps": steps}, indent=2))
    print(f"written to {RESULTS / 'floor-steps.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
