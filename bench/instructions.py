"""Instructions per message of the whole edge process, counted by callgrind.

    python -m bench.instructions [--messages 2000] [--base TREE] [--tree TREE]

A fixed workload: a private mosquitto holds N QoS 1 JSON messages (bench/_load.py's
readings on ``bench/dev<k>/m<j>``, 40 series) for edgepipe's persistent session, and
``edgepipe run`` with the example's 3 Wasm stages, AES-GCM and ``synchronous=FULL`` drains
them under ``valgrind --tool=callgrind`` (every thread; the kernel's work, fsync
included, is not counted), then stops on SIGTERM.  The same run with 2N messages, minus
the N run, divided by N, is the cost per message with the fixed cost of start-up and
shutdown taken out.  Instruction counts do not depend on the load of the machine, so a
change is seen without noise (under valgrind the process is the bottleneck, so every
batch is a full one, as in a drain).

Each workload runs with ``broker.redelivery_window_s`` 0 (no message is looked up as a
possible redelivery: the steady state) and 3600 (every message is: a drain right after a
reconnect); a window of wall-clock seconds would cover a share of the messages that
depends on valgrind's speed.

``--base TREE`` runs another checkout the same way (e.g. the state before a change:
``git worktree add /tmp/base COMMIT``) for a before/after table; each tree runs from /tmp
with ``PYTHONPATH=TREE`` (so the current directory does not shadow it) and its own
``pipeline.yaml`` chain and Wasm modules.  Before the counted runs each tree runs once
uncounted (under valgrind's ``none`` tool), which compiles its bytecode and fills its AOT
cache for the CPU valgrind presents, as on a device after its first start.  Writes bench/results/instructions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from devtools._mosquitto import Mosquitto

from . import _drain
from .e2e import write_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.M)


def _config(tree: Path, work: Path, broker: Mosquitto, client: str, window: float) -> Path:
    """edgepipe's config for ``tree``: its example chain, an AES-GCM store, FULL, and a
    redelivery window of ``window`` seconds after the connect."""
    example = yaml.safe_load((tree / "pipeline.yaml").read_text())
    chain = example["chain"]
    for stage in chain:
        stage["module"] = str(tree / stage["module"])
    key = work / "store.key"
    if not key.exists():
        subprocess.run(
            [sys.executable, "-m", "pipeline", "keys", "generate", "-o", str(key)],
            env=_env(tree),
            cwd="/tmp",
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return write_config(
        work, broker, client, key, chain, broker_extra={"redelivery_window_s": window}
    )


def _env(tree: Path, trace: Path | None = None) -> dict[str, str]:
    # a fixed hash seed: set and dict layouts (and so the instructions) repeat run to run
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if trace is not None:
        env["EDGEPIPE_TRACE_COMMITS"] = str(trace)
    return env


def _committed(trace: Path) -> int:
    if not trace.exists():
        return 0
    n = 0
    for line in trace.read_text().splitlines():
        try:
            n += json.loads(line)["msgs"]
        except (ValueError, KeyError):
            pass
    return n


def _run(tree: Path, work: Path, tag: str, n: int, callgrind: bool, window: float) -> int | None:
    """Drain ``n`` pre-queued messages with ``tree``'s edgepipe under valgrind; the
    instructions counted by callgrind (``callgrind`` false: valgrind's ``none`` tool, which
    counts nothing; returns None)."""
    with Mosquitto(workdir=work / f"broker-{tag}") as b:
        client = f"ins-{tag}"
        _drain.prequeue(b, [client], n)
        cfg = _config(tree, work, b, client, window)
        trace = work / f"trace-{tag}.jsonl"
        out = work / f"callgrind-{tag}.out"
        cmd = [sys.executable, "-m", "pipeline", "run", "-c", str(cfg)]
        if callgrind:
            tool = [
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                "--dump-line=no",
                "--compress-strings=no",
            ]
        else:
            tool = ["--tool=none"]
        cmd = ["valgrind", "-q", *tool, *cmd]
        p = subprocess.Popen(
            cmd,
            env=_env(tree, trace),
            cwd="/tmp",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 3600
            while _committed(trace) < n:
                if p.poll() is not None:
                    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                    raise RuntimeError(f"edgepipe ({tree}) exited {p.returncode}: {err[-800:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"edgepipe ({tree}) did not drain {n} messages")
                time.sleep(0.2)
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=3600)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        left = _drain.queue_left(b, client)
        if left or _committed(trace) != n:
            raise RuntimeError(f"{tree}: {left} left on the broker, {_committed(trace)} of {n}")
    if not callgrind:
        return None
    m = _TOTALS.search(out.read_bytes())
    if m is None:
        raise RuntimeError(f"no totals in {out}: {err.decode(errors='replace')[-800:]}")
    return int(m.group(1))


def measure(tree: Path, n: int, repeats: int, window: float) -> dict[str, Any]:
    """Instructions per message of ``tree``'s edge process: (I(2n) - I(n)) / n."""
    with tempfile.TemporaryDirectory(prefix="edgepipe-instr-") as tmp:
        work = Path(tmp)
        # bytecode, and an AOT cache for the CPU valgrind presents (its CPUID is not the
        # host's, so wasmtime would not use a cache compiled outside valgrind)
        _run(tree, work, "warm", 200, False, window)
        small, large = [], []
        for r in range(repeats):
            small.append(_run(tree, work, f"n-{r}", n, True, window))
            large.append(_run(tree, work, f"2n-{r}", 2 * n, True, window))
            shutil.rmtree(work / f"broker-n-{r}", ignore_errors=True)
            shutil.rmtree(work / f"broker-2n-{r}", ignore_errors=True)
    per = [(b - a) / n for a, b in zip(small, large, strict=True)]
    return {
        "tree": str(tree),
        "commit": _commit(tree),
        "messages": n,
        "redelivery_window_s": window,
        "instructions_n": small,
        "instructions_2n": large,
        "per_message": per,
        "per_message_median": statistics.median(per),
        "fixed_median": statistics.median(2 * a - b for a, b in zip(small, large, strict=True)),
    }


def _commit(tree: Path) -> str:
    p = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return p.stdout.strip() + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="N (the runs drain N and 2N)")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs per tree")
    ap.add_argument(
        "--window",
        type=float,
        action="append",
        help="broker.redelivery_window_s, repeatable (default: 0 and 3600, each measured)",
    )
    ap.add_argument("--tree", type=Path, default=REPO, help="the checkout measured")
    ap.add_argument("--base", type=Path, help="another checkout to compare with (before)")
    ap.add_argument("--out", type=Path, default=RESULTS / "instructions.json")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    res: dict[str, Any] = {"python": sys.version.split()[0], "runs": []}
    for window in args.window or [0.0, 3600.0]:
        run: dict[str, Any] = {"redelivery_window_s": window}
        if args.base is not None:
            run["before"] = measure(args.base.resolve(), args.messages, args.repeats, window)
        run["after"] = measure(args.tree.resolve(), args.messages, args.repeats, window)
        if "before" in run:
            before, after = run["before"], run["after"]
            run["change"] = after["per_message_median"] / before["per_message_median"] - 1
        res["runs"].append(run)
    print(f"\ninstructions per message, whole edge process (callgrind), N={args.messages:,}")
    for run in res["runs"]:
        print(f"redelivery window {run['redelivery_window_s']:g} s:")
        for k in ("before", "after"):
            if k in run:
                m = run[k]
                print(
                    f"  {k:6} {m['commit']:>16}: {m['per_message_median']:>12,.0f} per message, "
                    f"fixed start-up and shutdown {m['fixed_median'] / 1e6:,.0f} M"
                )
        if "change" in run:
            print(f"  change: {run['change']:+.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
