"""The smallest hard memory limit under which edgepipe still drains a backlog at >= 90 % of
its unlimited rate (``python -m bench.e2e --cgroup``).

A hard limit is what a memory cgroup sets (the kubelet does it from a Pod's
``resources.limits.memory``): the kernel charges the process's anonymous memory and the
page cache it uses (shared libraries' pages, the store's file pages) to the group,
reclaims the group's page cache when the limit is reached, and OOM-kills when nothing is
left to reclaim.  Each trial runs ``edgepipe run`` in a fresh cgroup of its own, under the
cgroup this process is in (cgroup v1 ``memory.limit_in_bytes``, or v2 ``memory.max``),
draining the same backlog (bench/_drain.py) on a fresh broker, each next to an unlimited
run; a trial passes when the limit was never reached, or at >= 90 % of the unlimited
rate in the median pair (:func:`bisect_limit`), and the limit is bisected to 1 MiB.
Needs root (or a delegated cgroup).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devtools._mosquitto import Mosquitto

from . import _drain

__all__ = ["MemoryCgroup", "bisect_limit", "trial_line"]

THRESHOLD = 0.90
_V1 = Path("/sys/fs/cgroup/memory")
_V2 = Path("/sys/fs/cgroup")


def _own_group() -> tuple[str, Path]:
    """("v1" or "v2", the directory of the memory cgroup this process is in)."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    if (_V1 / "memory.limit_in_bytes").exists():
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return "v1", _V1 / path.lstrip("/")
    if "memory" in (_V2 / "cgroup.controllers").read_text().split():
        for line in lines:
            if line.startswith("0::"):
                return "v2", _V2 / line[3:].lstrip("/")
    raise RuntimeError("no memory cgroup controller (neither cgroup v1 nor v2)")


class MemoryCgroup:
    """A child memory cgroup with a hard limit; :meth:`join` (as a ``preexec_fn``) moves
    the calling process into it; :meth:`remove` deletes it once its processes are gone."""

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.version, parent = _own_group()
        self.path = parent / name
        self.path.mkdir()
        limit_file = "memory.limit_in_bytes" if self.version == "v1" else "memory.max"
        (self.path / limit_file).write_text(str(limit_bytes))
        if self.version == "v2":
            (self.path / "memory.swap.max").write_text("0")

    def join(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def pressure(self) -> dict[str, int]:
        """What the limit did to the group: ``limit_hits`` (charges that met the limit and
        made the kernel reclaim: v1 ``memory.failcnt``, v2 ``memory.events`` ``max``),
        ``max_usage_bytes`` (its peak charge, page cache included) and ``major_faults``
        (pages read back from disk, e.g. a library's code the reclaim dropped)."""
        v1 = self.version == "v1"
        out = {"limit_hits": 0, "max_usage_bytes": 0, "major_faults": 0}
        try:
            if v1:
                out["limit_hits"] = int((self.path / "memory.failcnt").read_text())
                out["max_usage_bytes"] = int((self.path / "memory.max_usage_in_bytes").read_text())
            else:
                for line in (self.path / "memory.events").read_text().splitlines():
                    if line.startswith("max "):
                        out["limit_hits"] = int(line.split()[1])
                peak = self.path / "memory.peak"
                if peak.exists():
                    out["max_usage_bytes"] = int(peak.read_text())
            key = "total_pgmajfault" if v1 else "pgmajfault"
            for line in (self.path / "memory.stat").read_text().splitlines():
                if line.startswith(key + " "):
                    out["major_faults"] = int(line.split()[1])
        except OSError:
            pass
        return out

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def _drain_once(
    d: Path,
    tag: str,
    n: int,
    procs: int,
    config: Callable[[Path, Mosquitto, str], Path],
    cgroup: MemoryCgroup | None,
) -> dict[str, float]:
    with Mosquitto(workdir=d / f"broker-{tag}") as b:
        cid = f"cg-{tag}"
        _drain.prequeue(b, [cid], n, procs)
        cfg = config(d, b, cid)
        return _drain.drain_edgepipe(
            cfg, d / f"trace-{tag}.jsonl", n, preexec=cgroup.join if cgroup else None
        )


def bisect_limit(
    d: Path,
    n: int,
    procs: int,
    rounds: int,
    config: Callable[[Path, Mosquitto, str], Path],
    lo_mb: int = 16,
) -> dict[str, Any]:
    """Bisect the limit in MiB between ``lo_mb`` (checked to fail) and twice the unlimited
    peak RSS (checked to pass).

    Each trial is ``rounds`` pairs of drains, one unlimited and one under the limit, back to
    back (so a change in the machine's load hits both).  The rate compared is the sustained
    one, from the first commit to the last (start-up excluded: it is a third of a short
    drain, and its spread would swamp the comparison).  A trial passes if

    - the limit was never reached in any of its runs (no charge met it, nothing was
      reclaimed, no OOM kill): the kernel treated the process as it treats an unlimited
      one, so the rate is the unlimited rate whatever the spread of the pairs says; or
    - the median over the pairs of (limited rate / unlimited rate) is >= 90 % (a drain
      whose process is OOM-killed counts as rate 0)."""
    version, parent = _own_group()
    first = [_drain_once(d, f"free-{i}", n, procs, config, None) for i in range(rounds)]
    peak = statistics.median(m["peak_rss_mb"] for m in first)
    trials: list[dict[str, Any]] = []

    def passes(limit_mb: int) -> bool:
        free, rates, errors, ooms = [], [], [], 0
        hits = faults = usage = 0
        for i in range(rounds):
            tag = f"{limit_mb}-{i}"
            m = _drain_once(d, f"free{tag}", n, procs, config, None)
            free.append(m["steady_msg_per_s"])
            cg = MemoryCgroup(f"edgepipe-bench-{os.getpid()}-{tag}", limit_mb << 20)
            try:
                m = _drain_once(d, f"cg{tag}", n, procs, config, cg)
                rates.append(m["steady_msg_per_s"])
            except RuntimeError as e:
                rates.append(0.0)
                errors.append(str(e))
            finally:
                ooms += cg.oom_kills()
                p = cg.pressure()
                hits += p["limit_hits"]
                faults += p["major_faults"]
                usage = max(usage, p["max_usage_bytes"])
                cg.remove()
        fraction = statistics.median(r / f for r, f in zip(rates, free, strict=True))
        untouched = hits == 0 and ooms == 0 and not errors
        ok = untouched or fraction >= THRESHOLD
        trials.append(
            {
                "limit_mb": limit_mb,
                "msg_per_s": statistics.median(rates),
                "unlimited_msg_per_s": statistics.median(free),
                "fraction": fraction,
                "rates": rates,
                "unlimited_rates": free,
                "limit_hits": hits,
                "major_faults": faults,
                "max_usage_mb": usage / 2**20,
                "oom_kills": ooms,
                "passed": ok,
                "verdict": "limit never reached" if untouched else "rate",
                "error": "; ".join(errors)[:200] or ("OOM-killed" if ooms else ""),
            }
        )
        print(f"  {trial_line(trials[-1])}", flush=True)
        return ok

    hi = max(lo_mb + 1, int(2 * peak) + 1)
    if not passes(hi):
        raise RuntimeError(f"even {hi} MiB does not sustain {THRESHOLD:.0%} of the rate")
    lo = lo_mb
    if passes(lo):
        hi = lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return {
        "cgroup": f"{version} under {parent}",
        "rounds": rounds,
        "threshold": THRESHOLD,
        "unlimited_msg_per_s": statistics.median(r for t in trials for r in t["unlimited_rates"]),
        "unlimited_peak_rss_mb": peak,
        "min_limit_mb": hi,
        "trials": sorted(trials, key=lambda t: t["limit_mb"]),
        "load_average": os.getloadavg(),
    }


def trial_line(t: dict[str, Any]) -> str:
    """One trial as a line of the report."""
    rate = f"{t['msg_per_s']:,.0f} msg/s" if t["msg_per_s"] else (t["error"] or "no rate")
    how = (
        "never reached"
        if t["verdict"] == "limit never reached"
        else f"reached {t['limit_hits']:,} times, {t['major_faults']:,} major faults"
    )
    oom = f", OOM kills: {t['oom_kills']}" if t["oom_kills"] else ""
    return (
        f"limit {t['limit_mb']:>4} MiB: {rate} against {t['unlimited_msg_per_s']:,.0f} "
        f"unlimited (pairs' median {t['fraction']:.0%}; {how}; peak charge "
        f"{t['max_usage_mb']:.0f} MiB{oom}) -> {'pass' if t['passed'] else 'fail'}"
    )
