"""Cost of one alert evaluation on the receiver, per backend and fleet size.

Registers N devices, stores for each an hour of health snapshots (one a minute) and an
hour of readings of one metric through the backend's ingest (as uploads store them), then
times full evaluations of the six-rule example of docs/alerts.md (every kind) and one
device's evaluation (what an upload triggers).  Medians of ``--runs``; nothing fires (the
fleet is healthy), so the figures are the reads alone.

    python -m bench.alerts                         # both backends, 100 and 1000 devices
    python -m bench.alerts --backend sqlite --devices 1000 --runs 7
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from cloud._alert_rules import parse_alert_rules
from cloud._alerts import AlertEngine
from cloud._health_wire import HealthSnapshot
from cloud._wire import Batch, Upload
from core._clock import ManualClock

RULES = {
    "rules": [
        {"name": "store", "kind": "store_full", "above": 0.9},
        {"name": "breaker", "kind": "breaker_open"},
        {"name": "session", "kind": "session_lost", "within_min": 60},
        {"name": "clock", "kind": "clock_skew", "above_s": 300},
        {"name": "silent", "kind": "silent", "for_min": 15},
        {"name": "no-pm25", "kind": "no_readings", "metric": "pm25", "for_min": 30},
    ]
}


def _fill(backend: object, devices: int, now: int) -> None:
    for d in range(devices):
        name = f"aq-{d:04d}"
        backend.add_device(name, os.urandom(32))  # type: ignore[attr-defined]
        ts = [now - 3_600_000 + i * 60_000 for i in range(60)]
        batch = Batch(1, hashlib.sha256(name.encode()).hexdigest(), [("s1", "pm25", ())],
                      [0] * 60, ts, [float(i) for i in range(60)], [0] * 60)  # fmt: skip
        health = [
            HealthSnapshot(i + 1, t, {"ts": t, "store_used_b": 1 << 20, "store_quota_b": 1 << 30,
                                      "sessions_lost": 0, "breaker_open:scale": 0, "rss_kb": 40_000})
            for i, t in enumerate(ts)
        ]  # fmt: skip
        up = Upload(name, {}, [batch], health=health, clock_skew_ms=0)
        backend.ingest(up, link="wifi", nbytes=1, nonce=os.urandom(16).hex(),  # type: ignore[attr-defined]
                       nonce_expires=now + 60_000, now=now)  # fmt: skip


def _median_ms(fn: object, runs: int) -> float:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--devices", type=int, action="append")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from tests.helpers.cloud_client import open_test_backend

    kinds = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    rules = parse_alert_rules(RULES)
    for kind in kinds:
        for n in args.devices or [100, 1000]:
            with tempfile.TemporaryDirectory() as tmp, open_test_backend(kind, Path(tmp)) as b:
                now = int(time.time() * 1000)
                _fill(b, n, now)
                engine = AlertEngine(b, rules, clock=ManualClock(now / 1000))
                assert engine.evaluate() == []
                full = _median_ms(engine.evaluate, args.runs)
                one = _median_ms(functools.partial(engine.evaluate, {"aq-0000"}), args.runs * 4)
                print(
                    f"{kind:8} {n:5} devices, 6 rules: full evaluation {full:8.1f} ms "
                    f"({full / n:.2f} ms/device); one device (an upload) {one:6.2f} ms"
                )


if __name__ == "__main__":
    main()
