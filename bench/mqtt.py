"""How the batch settings trade latency for throughput (the BatchConfig defaults come from here).

    python -m bench.mqtt [--messages 20000] [--rate 1000] [--seconds 4]

On a private mosquitto: edgepipe at QoS 1 (ack after durable commit, encrypted store, no
filter chain so the batch policy is what is measured), for several ``max_messages`` /
``max_delay_ms`` pairs:

* throughput with publishers flooding (bench/_load.py, 2 processes);
* publish -> durable commit latency p50/p99 at a steady ``--rate`` msg/s;
* commits (fsyncs) per second at that rate: the write load on the SD card.

Writes bench/results/mqtt.json.  Uses the commit trace hook (EDGEPIPE_TRACE_COMMITS).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from devtools._mosquitto import Mosquitto

from ._load import run_publishers, start_publishers
from .e2e import Edge, _pct
from .e2e import _config as e2e_config

REPO = Path(__file__).resolve().parents[1]
SWEEP = [(500, 0), (500, 2), (500, 5), (500, 10), (500, 20), (100, 5), (2000, 5)]


def _config(d: Path, b: Mosquitto, name: str, max_messages: int, delay: int) -> Path:
    batch = {"max_messages": max_messages, "max_delay_ms": delay}
    return e2e_config(d, b, 1, False, name, batch=batch)


def _wait(edge: Edge, n: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while sum(c["msgs"] for c in edge.commits()) < n and time.time() < deadline:
        time.sleep(0.1)


def run_one(b: Mosquitto, d: Path, mm: int, delay: int, n: int, rate: int, secs: float) -> dict:
    name = f"sweep-{mm}-{delay}"
    edge = Edge(_config(d, b, name + "-tp", mm, delay), d / f"{name}-tp.jsonl")
    edge.wait_subscribed()
    pubs, _ = start_publishers(b.host, b.port, n, procs=2, qos=1)
    _wait(edge, n, 300)
    for p in pubs:
        p.join(30)
    edge.stop()
    c = edge.commits()
    dt = c[-1]["t"] - c[0]["t"]
    tput = (sum(x["msgs"] for x in c) - c[0]["msgs"]) / dt if dt > 0 else 0.0

    edge = Edge(_config(d, b, name + "-lat", mm, delay), d / f"{name}-lat.jsonl")
    edge.wait_subscribed()
    m = int(rate * secs)
    run_publishers(b.host, b.port, m, procs=1, qos=1, rate=rate)
    _wait(edge, m, 30)
    edge.stop()
    c = edge.commits()
    lat = sorted(x["t"] * 1000 - ts for x in c for ts in x["ts"])
    span = c[-1]["t"] - c[0]["t"] if len(c) > 1 else 1.0
    return {
        "max_messages": mm,
        "max_delay_ms": delay,
        "throughput_msg_s": tput,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "commits_per_s": len(c) / span,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mqtt.json")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        for mm, delay in SWEEP:
            # a fresh broker each time: the earlier runs' persistent sessions would
            # otherwise keep queuing every message (and inflate the broker's autosaves)
            with Mosquitto() as b:
                r = run_one(b, Path(tmp), mm, delay, args.messages, args.rate, args.seconds)
            results.append(r)
            print(
                f"max_messages {mm:>5}  max_delay_ms {delay:>3}:  {r['throughput_msg_s']:>8,.0f} "
                f"msg/s flooded;  at {args.rate}/s p50 {r['p50_ms']:5.1f} ms  p99 "
                f"{r['p99_ms']:5.1f} ms  {r['commits_per_s']:5.0f} commits/s",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
