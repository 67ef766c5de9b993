"""What the dashboard's health reads cost on SQLite, with a fleet's worth of snapshots.

A receiver database with DEVICES devices and DAYS days of health snapshots each (one a
minute, 30 keys: what a device with a 3-stage chain sends), then, median of 5 runs each:

* the fleet table's badges (``health_overview``: each device's newest snapshot and the
  oldest of the last hour, one query) and the whole fleet view with them;
* one device's health panel (``health_buckets`` + ``health_view``) over 24 h (every
  snapshot read) and 30 d (more than ``EXACT_MAX``: the last snapshot of each bucket).

    python -m bench.health_ui                      # 300 devices x 2 days (~860 k snapshots)
    python -m bench.health_ui --devices 50 --days 31
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud import open_backend
from cloud._badges import Thresholds
from cloud._health_view import health_view
from cloud._ui_api import RANGES_MS, chart_window, fleet_view

MIN = 60_000


def _snapshot(i: int, ts: int) -> str:
    v: dict[str, Any] = {"ts": ts, "cpu_ms": 900 * i, "rss_kb": 40_000 + i % 500}
    v |= {"store_used_b": 1000 * i, "store_quota_b": 1 << 30, "disk_free_b": 1 << 33}
    v |= {"link_bytes:wifi": 2000 * (i % 1440), "sessions_lost": 0, "mqtt_connected": 1}
    for s in ("validity", "calibrate", "window"):
        v |= {f"stage:{s}:in": 60 * i, f"stage:{s}:out": 59 * i, f"drops:{s}:out_of_range": i}
        v |= {f"traps:{s}:unreachable": i // 100, f"breaker_open:{s}": 0}
        v |= {f"dead_letters:{s}:unreachable": i // 100}
    v |= {"clock_skew_ms": 120, "receiver_skew_ms": 0, "chain": "0123456789abcdef"}
    return json.dumps(v, separators=(",", ":"))


def build(path: Path, devices: int, days: int, now: int) -> None:
    open_backend(f"sqlite:///{path}").close()
    n = days * 1440
    con = sqlite3.connect(path)
    with con:
        for d in range(devices):
            cur = con.execute(
                "INSERT INTO devices (name, secret, created_ms) VALUES (?, 'x', ?)",
                (f"gw-{d:04d}", now),
            )
            did = cur.lastrowid
            con.executemany(
                "INSERT INTO device_health (device_id, seq, ts, data, received_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    (did, i + 1, now - (n - i) * MIN, _snapshot(i, now - (n - i) * MIN), now)
                    for i in range(n)
                ),
            )
    con.close()


def median_ms(fn: Callable[[], Any], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=300)
    ap.add_argument("--days", type=int, default=2)
    args = ap.parse_args()
    now = int(time.time() * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cloud.db"
        t = time.perf_counter()
        build(path, args.devices, args.days, now)
        rows = args.devices * args.days * 1440
        print(f"{args.devices} devices x {args.days} d: {rows:,} snapshots, "
              f"{path.stat().st_size / 1e6:.0f} MB, built in {time.perf_counter() - t:.0f} s")  # fmt: skip
        with open_backend(f"sqlite:///{path}", create=False) as b:
            th = Thresholds()
            devices = b.list_devices()
            overview = median_ms(lambda: b.health_overview(now - th.window_ms))
            fleet = median_ms(
                lambda: fleet_view(
                    devices, {}, now, 300_000, b.health_overview(now - th.window_ms), th
                )
            )
            print(f"fleet badges (health_overview): {overview:.1f} ms; fleet view with them: "
                  f"{fleet:.1f} ms")  # fmt: skip
            for r in ("24h", "7d", "30d"):
                since, until, step = chart_window(now - RANGES_MS[r], now + 1)

                def panel(since: int = since, until: int = until, step: int = step) -> dict:
                    base, snaps = b.health_buckets("gw-0000", since, until, step)
                    return health_view(snaps, base, since, until, step)

                got = panel()
                print(f"health panel {r}: {median_ms(panel):.1f} ms "
                      f"({got['snapshots']} snapshots read, {len(got['ts'])} buckets)")  # fmt: skip


if __name__ == "__main__":
    main()
