"""End-to-end benchmark of the edge process, side by side with a bare paho subscriber.

    python -m bench.e2e [--messages 40000] [--quick]
    python -m bench.e2e --tls [--repeats 3]
    python -m bench.e2e --drain [--messages 100000] [--rounds 3] [--against TREE]
    python -m bench.e2e --cgroup [--messages 100000]

In one run, on a private mosquitto on loopback:

* throughput at QoS 1 (ack after durable commit, encryption on, the example's 3-stage
  Wasm chain) and at QoS 0, against a bare paho subscriber that only counts messages --
  the ceiling for a Python MQTT consumer on the same broker and load;
* publish-to-durable-commit latency p50/p99 at a fixed 1,000 msg/s (medians of 3 runs);
* peak RSS of the edge process (VmHWM), and idle RSS with and without the Wasm chain;
* cold start: process exec -> subscribed (retained "online" status seen by an observer),
  and exec -> first reading durably stored (a retained reading waits on the broker).

The load comes from separate publisher processes (bench/_load.py): for throughput,
publishers that write pre-encoded MQTT packets on their sockets, so that the broker, not
the load, bounds a run (``--paho-publishers``: paho clients instead, which top out below
edgepipe's rate); for latency, a paho client paced at 1,000 msg/s.  Prints a table and
writes bench/results/e2e.json.  Timings are measurements, never test assertions.

``--tls`` measures what TLS costs instead: throughput at QoS 1 and 0 of edgepipe and of the
bare subscriber, over plain TCP and over TLS (publishers, subscriber and edgepipe all on
the broker's TLS listener; server certificate from a throw-away CA, bench/_pki.py), the
four measurements of each QoS interleaved and repeated, medians reported; and edgepipe's
peak RSS on each transport.  Writes bench/results/e2e-tls.json.

``--drain`` measures the backlog drain (bench/_drain.py): a broker holding the same N
QoS 1 JSON messages for two persistent sessions, drained by ``mosquitto_sub -q 1`` (a C
client that only receives) and by edgepipe (3 Wasm stages, AES-GCM, ``synchronous=FULL``),
in rotating order, a fresh broker per round; medians.  With ``--against TREE``, that
checkout's edgepipe drains a third session of the same broker each round: the sustained
QoS 1 rate of both trees where the consumer, not the broker or the load, is the bound.
Writes bench/results/e2e-drain.json.

``--against TREE`` compares another checkout (e.g. main: ``git worktree add --detach
/tmp/main main``) with this one in the same run: for each of ``--rounds`` rounds, the two
trees alternating, edgepipe's QoS 1 throughput and peak RSS, its idle RSS with the chain
and its cold start, each tree started from its own sources (``PYTHONPATH``), the example
chain of this tree; medians.  Writes bench/results/e2e-against.json.

``--cgroup`` bisects the smallest hard memory limit (a memory cgroup, as the kubelet sets
one) under which edgepipe still drains at >= 90 % of its unlimited rate
(bench/_cgroup.py).  Writes bench/results/e2e-cgroup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from devtools._mosquitto import Mosquitto, free_port

from . import _drain
from ._load import run_publishers, start_publishers
from ._pki import ThrowAwayCA

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


class _Load:
    """The throughput runs' publishers: ``raw`` (bench/_load.py's socket publisher, bound
    by the broker) unless ``--paho-publishers`` (paho clients, ~5-7k QoS 1 msg/s a
    process, below what edgepipe consumes: the harness of the figures up to commit
    b0626ec, kept to compare with them).  The latency run always paces paho clients."""

    raw = True


LOAD = _Load()


def _chain() -> list[dict[str, Any]]:
    cfg = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    chain = cfg["chain"]
    for stage in chain:
        stage["module"] = str(REPO / stage["module"])
    return chain


class TLS(NamedTuple):
    """The broker's TLS listener: the CA clients verify it with, its certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def issue(cls, d: Path) -> TLS:
        ca = ThrowAwayCA(d)
        return cls(ca.path, *ca.issue("broker"))


def _broker(d: Path, name: str, tls: TLS | None = None) -> Mosquitto:
    # a fresh broker per measurement: earlier runs' persistent sessions would keep queuing
    # every later message and load the broker
    if tls is None:
        return Mosquitto(workdir=d / f"broker-{name}")
    port = free_port()
    tls_conf = f"cafile {tls.ca}\ncertfile {tls.cert}\nkeyfile {tls.key}\n"
    extra = f"listener {port} 127.0.0.1\n{tls_conf}"
    return Mosquitto(port=port, workdir=d / f"broker-{name}", extra=extra)


def _config(
    d: Path,
    broker: Mosquitto,
    qos: int,
    chain: bool,
    client: str,
    tls: TLS | None = None,
    batch: dict[str, int] | None = None,
) -> Path:
    from storage import generate_key_line

    key = d / "store.key"
    if not key.exists():
        key.write_text(generate_key_line() + "\n")
        key.chmod(0o600)
    broker_cfg: dict[str, Any] = {**({"tls": {"ca_file": str(tls.ca)}} if tls else {})}
    return write_config(
        d,
        broker,
        client,
        key,
        _chain() if chain else [],
        qos=qos,
        broker_extra=broker_cfg,
        batch=batch,
    )


def write_config(
    d: Path,
    broker: Mosquitto,
    client: str,
    key: Path,
    chain: list[dict[str, Any]],
    *,
    qos: int = 1,
    broker_extra: dict[str, Any] | None = None,
    batch: dict[str, int] | None = None,
) -> Path:
    """``d/<client>.yaml``: session ``client`` on ``broker``, ``bench/{device}/{metric}`` at
    ``qos``, ``chain``, an encrypted store ``d/<client>.db`` under ``key``, no sync, no
    metrics listener (also bench.instructions' config for another checkout)."""
    cfg = {
        "device": {"id": "bench"},
        "broker": {
            "host": broker.host,
            "port": broker.port,
            "client_id": client,
            **(broker_extra or {}),
        },
        "subscriptions": [{"topic": "bench/{device}/{metric}", "qos": qos}],
        "chain": chain,
        **({"batch": batch} if batch else {}),
        "store": {"path": str(d / f"{client}.db"), "key": {"file": str(key)}},
        "sync": {"enabled": False},
        "metrics": {"listen": None},
        "log_level": "warning",
    }
    p = d / f"{client}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


class Edge:
    def __init__(self, config: Path, trace: Path, tree: Path = REPO) -> None:
        self.trace = trace
        trace.unlink(missing_ok=True)
        env = {**os.environ, "EDGEPIPE_TRACE_COMMITS": str(trace)}
        if tree != REPO:
            env["PYTHONPATH"] = str(tree)
        self.t_exec = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "-c", str(config), "--log-level", "info"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tree,
        )
        self.peak_rss_kb = 0

    def wait_subscribed(self, timeout: float = 30) -> None:
        assert self.proc.stderr is not None
        deadline = time.time() + timeout
        for line in self.proc.stderr:
            if "subscribed to" in line:
                return
            if time.time() > deadline:
                break
        raise RuntimeError("edgepipe did not subscribe")

    def sample_rss(self) -> None:
        try:
            for line in open(f"/proc/{self.proc.pid}/status"):
                if line.startswith("VmHWM:"):
                    self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
        except OSError:
            pass

    def cpu_seconds(self) -> float:
        """utime + stime of the edge process so far (every thread)."""
        try:
            return _drain.cpu_seconds(self.proc.pid)
        except OSError:
            return float("nan")

    def commits(self) -> list[dict[str, Any]]:
        if not self.trace.exists():
            return []
        out = []
        for line in self.trace.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self) -> None:
        self.sample_rss()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _mosquitto_sub_live(broker: Mosquitto, n: int, procs: int) -> dict[str, float]:
    """``mosquitto_sub -q 1`` (a C client that only receives and acknowledges) under the
    same live load: the ceiling of this harness for any QoS 1 consumer -- the broker takes
    the publishers' messages and delivers them on the same cores.  Its session is made
    first (``-E``: exit once subscribed), so nothing published after is missed; the rate
    is ``n`` over the time from the publishers' start to its exit (an upper bound of its
    time, so a lower bound of its rate)."""
    base = [_drain.mosquitto_sub(), "-h", broker.host, "-p", str(broker.port), "-V", "5"]
    sess = ["-q", "1", "-c", "-x", "600", "-i", "bench-live-sub", "-t", "bench/+/+"]
    subprocess.run([*base, *sess, "-E"], check=True, timeout=30)
    p = subprocess.Popen([*base, *sess, "-C", str(n)], stdout=subprocess.DEVNULL)
    # the publishers start at a shared time 0.5 s after they are started (bench/_load.py)
    t_start = time.perf_counter() + 0.5
    pubs, _ = start_publishers(broker.host, broker.port, n, procs=procs, qos=1, raw=LOAD.raw)
    p.wait(600)
    dt = time.perf_counter() - t_start
    for pub in pubs:
        pub.join(30)
    return {"messages": n, "seconds": dt, "msg_per_s": n / dt}


def _bare(
    broker: Mosquitto, qos: int, n: int, d: Path, procs: int, tls: TLS | None = None
) -> dict[str, float]:
    out = d / f"bare-{qos}.json"
    out.unlink(missing_ok=True)
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench._bare",
            broker.host,
            str(broker.port),
            "bench/+/+",
            str(qos),
            str(n),
            str(out),
            *([str(tls.ca)] if tls else []),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert p.stdout is not None
    p.stdout.readline()  # "subscribed"
    run_publishers(
        broker.host, broker.port, n, procs=procs, qos=qos, ca=tls and tls.ca, raw=LOAD.raw
    )
    p.wait(600)
    st = json.loads(out.read_text())
    dt = st["last"] - st["first"]
    return {"messages": st["n"], "seconds": dt, "msg_per_s": st["n"] / dt if dt else 0.0}


def _edge_throughput(
    broker: Mosquitto,
    qos: int,
    n: int,
    d: Path,
    procs: int,
    chain: bool = True,
    tls: TLS | None = None,
    tag: str = "",
    tree: Path = REPO,
) -> dict[str, float]:
    client = f"edge-q{qos}-{int(chain)}{tag}"
    edge = Edge(_config(d, broker, qos, chain, client, tls), d / f"trace-q{qos}.jsonl", tree)
    edge.wait_subscribed()
    cpu0 = edge.cpu_seconds()  # start-up and subscribing: not part of the rate
    pubs, q = start_publishers(
        broker.host, broker.port, n, procs=procs, qos=qos, ca=tls and tls.ca, raw=LOAD.raw
    )
    deadline = time.time() + 600
    got = 0
    while time.time() < deadline:
        edge.sample_rss()
        commits = edge.commits()
        got = sum(c["msgs"] for c in commits)
        if got >= n:
            break
        if (
            qos == 0
            and all(not p.is_alive() for p in pubs)
            and commits
            and time.time() - commits[-1]["t"] > 3
        ):
            break  # QoS 0 may drop under overload; stop when the stream is over
        time.sleep(0.2)
    cpu = edge.cpu_seconds() - cpu0
    for p in pubs:
        p.join(30)
    edge.stop()
    commits = edge.commits()
    got = sum(c["msgs"] for c in commits)
    # from the first commit to the last: excludes start-up, includes every fsync
    first = commits[0]["t"] - 0.0
    dt = commits[-1]["t"] - first
    rate = (got - commits[0]["msgs"]) / dt if dt > 0 else 0.0
    return {
        "messages": got,
        "seconds": dt,
        "msg_per_s": rate,
        "peak_rss_mb": edge.peak_rss_kb / 1024,
        # CPU per message from subscribed to the last commit: the rate of a run the broker
        # or the publishers bound is the slowest party's, this is edgepipe's own cost
        "cpu_us_per_msg": cpu / got * 1e6 if got else float("nan"),
        "batches": len(commits),
        "mean_batch": got / len(commits) if commits else 0,
    }


def _latency_runs(d: Path, rate: int, seconds: float, runs: int) -> dict[str, Any]:
    """:func:`_latency` ``runs`` times, a fresh broker each: the medians over the runs (a
    run's p99 is its 1 % slowest readings: on a shared machine one stall of the disk or
    the CPU of a few tens of ms lands in it, so a single run's p99 is a sample, the median
    of runs the figure), and every run."""
    each = []
    for i in range(runs):
        with _broker(d, f"latency-{i}") as b:
            each.append(_latency(b, d, rate, seconds, f"-{i}"))
    med = {k: statistics.median(m[k] for m in each) for k in each[0]}
    return {**med, "runs": runs, "each": each}


def _latency(
    broker: Mosquitto, d: Path, rate: int, seconds: float, tag: str = ""
) -> dict[str, float]:
    edge = Edge(_config(d, broker, 1, True, f"edge-lat{tag}"), d / f"trace-lat{tag}.jsonl")
    edge.wait_subscribed()
    n = int(rate * seconds)
    run_publishers(broker.host, broker.port, n, procs=1, qos=1, rate=rate)
    deadline = time.time() + 30
    while sum(c["msgs"] for c in edge.commits()) < n and time.time() < deadline:
        time.sleep(0.1)
    edge.sample_rss()
    edge.stop()
    lat = []
    for c in edge.commits():
        lat.extend((c["t"] * 1000 - ts) for ts in c["ts"])
    lat.sort()
    # the payload's ts has millisecond resolution after parsing: +-0.5 ms
    return {
        "readings": len(lat),
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "max_ms": lat[-1] if lat else float("nan"),
        "peak_rss_mb": edge.peak_rss_kb / 1024,
    }


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def _warm_aot_cache(d: Path) -> float:
    """Compile the chain into the cache the edge runs share (as a device's first start
    does once); returns the compile time.  Later starts load the compiled modules."""
    from config._models import StageConfig
    from core._model import SeriesRegistry
    from pipeline.chain._chain import Chain

    stages = [StageConfig.model_validate(s) for s in _chain()]
    t0 = time.perf_counter()
    Chain.build(stages, SeriesRegistry(), base_dir=REPO, cache_dir=d / ".edgepipe-cache").close()
    return (time.perf_counter() - t0) * 1000


def _first_start(d: Path, tree: Path = REPO, tag: str = "") -> None:
    """One short run of ``tree``'s edgepipe (500 QoS 1 readings), not measured: what a
    device's first start compiles into the AOT cache beyond the chain (the ingest and
    check kernels, on their first batch) is then compiled, so that no measured run pays
    for it -- a compile costs the process that does it ~5 MB of resident Cranelift code
    and heap for its life (docs/performance.md)."""
    with _broker(d, f"first{tag}") as b:
        _edge_throughput(b, 1, 500, d, 1, tag=f"-first{tag}", tree=tree)


def _cold_start(
    broker: Mosquitto, d: Path, runs: int, tree: Path = REPO, tag: str = ""
) -> dict[str, float]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    _drain.compile_bytecode(tree)  # as installed

    seen: dict[str, float] = {}
    obs = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-obs")
    obs.on_message = lambda c, u, m: seen.__setitem__(m.payload.decode(), time.time())
    obs.connect(broker.host, broker.port)
    obs.subscribe("edgepipe/bench/status", 1)
    obs.loop_start()
    to_sub, to_commit = [], []
    try:
        for i in range(runs):
            cfg = _config(d, broker, 1, True, f"edge-cold{tag}-{i}")
            # a retained reading waits on the broker: delivered as soon as edgepipe subscribes
            pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
            pub.connect(broker.host, broker.port)
            pub.loop_start()
            pub.publish(
                "bench/cold/m0", json.dumps({"value": 1.0, "ts": time.time()}), qos=1, retain=True
            ).wait_for_publish(10)
            pub.disconnect()
            pub.loop_stop()
            seen.clear()
            edge = Edge(cfg, d / f"trace-cold-{i}.jsonl", tree)
            deadline = time.time() + 30
            while time.time() < deadline and (not edge.commits() or "online" not in seen):
                time.sleep(0.002)
            c = edge.commits()
            if c and "online" in seen:
                to_sub.append((seen["online"] - edge.t_exec) * 1000)
                to_commit.append((c[0]["t"] - edge.t_exec) * 1000)
            edge.stop()
    finally:
        obs.loop_stop()
        obs.disconnect()
    return {
        "runs": len(to_sub),
        "exec_to_subscribed_ms": statistics.median(to_sub),
        "exec_to_first_commit_ms": statistics.median(to_commit),
    }


def _idle_rss(
    broker: Mosquitto,
    d: Path,
    runs: int,
    tree: Path = REPO,
    chains: tuple[bool, ...] = (True, False),
    tag: str = "",
) -> dict[str, dict[str, float]]:
    """Resident memory of an idle, subscribed edge process with the 3-stage Wasm chain and
    with none (medians of ``runs`` starts, AOT cache warm): what the chain adds."""
    out = {}
    for chain in chains:
        samples: dict[str, list[float]] = {"VmRSS": [], "RssAnon": [], "RssFile": []}
        for i in range(runs):
            cfg = _config(d, broker, 1, chain, f"edge-idle{tag}-{chain}-{i}")
            edge = Edge(cfg, d / "idle.jsonl", tree)
            edge.wait_subscribed()
            time.sleep(1)
            for line in open(f"/proc/{edge.proc.pid}/status"):
                name = line.split(":")[0]
                if name in samples:
                    samples[name].append(int(line.split()[1]) / 1024)
            edge.stop()
        out["chain" if chain else "no_chain"] = {
            k.lower() + "_mb": statistics.median(v) for k, v in samples.items()
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--messages",
        type=int,
        help="messages per throughput run (default 40,000; --drain, --cgroup 100,000)",
    )
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes")
    ap.add_argument(
        "--paho-publishers",
        action="store_true",
        help="throughput load from paho clients (bound by the publishers) instead of raw sockets",
    )
    ap.add_argument("--quick", action="store_true", help="small runs (a smoke test)")
    ap.add_argument(
        "--tls", action="store_true", help="throughput over TLS against plain TCP (only that)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="with --tls: runs of each measurement")
    ap.add_argument(
        "--drain", action="store_true", help="backlog drain next to mosquitto_sub (only that)"
    )
    ap.add_argument(
        "--cgroup", action="store_true", help="the smallest memory limit for 90 %% of the rate"
    )
    ap.add_argument(
        "--against",
        type=Path,
        metavar="TREE",
        help="QoS 1 throughput, peak and idle RSS, cold start of TREE next to this tree (only "
        "that); with --drain, TREE's drain beside this tree's and mosquitto_sub's",
    )
    ap.add_argument("--rounds", type=int, default=3, help="with --drain/--cgroup: rounds")
    ap.add_argument("--out", type=Path, help="the JSON (default bench/results/e2e[-tls].json)")
    args = ap.parse_args(argv)
    LOAD.raw = not args.paho_publishers
    mode = (
        "tls"
        if args.tls
        else "drain"
        if args.drain
        else "cgroup"
        if args.cgroup
        else "against"
        if args.against
        else ""
    )
    out = args.out or RESULTS / (f"e2e-{mode}.json" if mode else "e2e.json")
    n = args.messages or (100_000 if args.drain or args.cgroup else 40_000)
    if args.quick:
        n = 3000
    lat_s = 3 if args.quick else 10
    cold_runs = 2 if args.quick else 5
    res: dict[str, Any] = {
        "messages": n,
        "publishers": args.publishers,
        "publisher": "raw" if LOAD.raw else "paho",
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        d = Path(tmp)
        res["aot_compile_ms"] = _warm_aot_cache(d)
        if not args.against or args.drain:
            _first_start(d)
        if args.tls:
            res.update(_tls_comparison(d, n, args.publishers, 1 if args.quick else args.repeats))
            _print_tls(res)
        elif args.drain:
            other = args.against.resolve() if args.against else None
            res.update(_drain_comparison(d, n, args.publishers, args.rounds, other))
            _print_drain(res)
        elif args.against:
            rounds = 1 if args.quick else args.rounds
            res.update(_against(d, n, args.publishers, rounds, args.against.resolve()))
            _print_against(res)
        elif args.cgroup:
            from ._cgroup import bisect_limit

            res.update(bisect_limit(d, n, args.publishers, args.rounds, _drain_config))
            _print_cgroup(res)
        else:
            with _broker(d, "sub-live") as b:
                res["mosquitto_sub_q1"] = _mosquitto_sub_live(b, n, args.publishers)
            for qos in (1, 0):
                with _broker(d, f"bare{qos}") as b:
                    res[f"bare_q{qos}"] = _bare(b, qos, n, d, args.publishers)
                with _broker(d, f"edge{qos}") as b:
                    res[f"edge_q{qos}"] = _edge_throughput(b, qos, n, d, args.publishers)
            res["latency_1000"] = _latency_runs(d, 1000, lat_s, 1 if args.quick else 3)
            with _broker(d, "cold") as b:
                res["cold_start"] = _cold_start(b, d, cold_runs)
            with _broker(d, "idle") as b:
                res["idle_rss"] = _idle_rss(b, d, 2 if args.quick else 3)
            _print(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


def _tls_comparison(d: Path, n: int, procs: int, repeats: int) -> dict[str, Any]:
    """Bare subscriber and edgepipe, plain TCP and TLS, QoS 1 and 0: each measurement on a
    fresh broker, the four of a QoS run back to back (so drift of the machine hits them
    alike), ``repeats`` times; medians and every run."""
    tls = TLS.issue(d)
    runs: dict[str, list[dict[str, float]]] = {}
    for r in range(repeats):
        for qos in (1, 0):
            for name, t in (("plain", None), ("tls", tls)):
                key = f"{name}_q{qos}"
                with _broker(d, f"bare-{key}-{r}", t) as b:
                    runs.setdefault(f"bare_{key}", []).append(_bare(b, qos, n, d, procs, t))
                with _broker(d, f"edge-{key}-{r}", t) as b:
                    m = _edge_throughput(b, qos, n, d, procs, tls=t, tag=f"-{name}-{r}")
                    runs.setdefault(f"edge_{key}", []).append(m)
    median = {k: {f: statistics.median(m[f] for m in ms) for f in ms[0]} for k, ms in runs.items()}
    return {"repeats": repeats, "median": median, "runs": runs}


def _against(d: Path, n: int, procs: int, rounds: int, other: Path) -> dict[str, Any]:
    """``other`` and this tree, alternating within each round (the order swapped every
    round): QoS 1 throughput and peak RSS, idle RSS with the chain, cold start."""
    trees = {"base": other, "this": REPO}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    for label, tree in trees.items():
        _drain.compile_bytecode(tree)  # as installed, before the first measurement
        _first_start(d, tree, f"-{label}")
    for r in range(rounds):
        for label in ("base", "this") if r % 2 == 0 else ("this", "base"):
            tree, tag = trees[label], f"-{label}-{r}"
            m: dict[str, float] = {}
            with _broker(d, f"edge{tag}") as b:
                q1 = _edge_throughput(b, 1, n, d, procs, tag=tag, tree=tree)
            m.update({k: q1[k] for k in ("msg_per_s", "cpu_us_per_msg", "peak_rss_mb")})
            with _broker(d, f"idle{tag}") as b:
                m.update(_idle_rss(b, d, 1, tree, (True,), tag)["chain"])
                m.update(_cold_start(b, d, 1, tree, tag))
            runs[label].append(m)
    median = {k: {f: statistics.median(m[f] for m in ms) for f in ms[0]} for k, ms in runs.items()}
    return {
        "trees": {k: str(v) for k, v in trees.items()},
        "rounds": rounds,
        "median": median,
        "runs": runs,
        "load_average": os.getloadavg(),
    }


def _print_against(r: dict[str, Any]) -> None:
    print(
        f"\nedgepipe, {r['trees']['base']} (base) against this tree, {r['messages']:,} QoS 1 "
        f"messages, median of {r['rounds']} rounds (load {r['load_average'][0]:.1f})"
    )
    cols = (
        ("msg_per_s", "QoS 1 msg/s", ",.0f"),
        ("cpu_us_per_msg", "CPU us/msg", ".1f"),
        ("peak_rss_mb", "peak MB", ".1f"),
        ("vmrss_mb", "idle MB", ".1f"),
        ("rssanon_mb", "anon", ".1f"),
        ("rssfile_mb", "file", ".1f"),
        ("exec_to_subscribed_ms", "subscribed ms", ".0f"),
        ("exec_to_first_commit_ms", "stored ms", ".0f"),
    )
    print(f"{'':6}" + "".join(f"{h:>15}" for _, h, _ in cols))
    for label in ("base", "this"):
        m = r["median"][label]
        print(f"{label:6}" + "".join(f"{m[k]:>15{f}}" for k, _, f in cols))


def _drain_config(d: Path, broker: Mosquitto, client: str) -> Path:
    """edgepipe's config for a drain: the example chain, AES-GCM, FULL, session ``client``."""
    return _config(d, broker, 1, True, client)


def _drain_comparison(
    d: Path, n: int, procs: int, rounds: int, other: Path | None = None
) -> dict[str, Any]:
    """Each round a fresh broker holds the same ``n`` messages for a mosquitto_sub session
    and an edgepipe session (and, with ``other``, one for that checkout's edgepipe: the
    sustained QoS 1 rate of both trees at saturation, side by side); they drain one after
    the other, the order rotating from round to round."""
    who_all = ["mosquitto_sub", "edgepipe"] + (["base"] if other else [])
    trees = {"edgepipe": REPO, "base": other or REPO}
    if other:
        _first_start(d, other, "-base")
    runs: dict[str, list[dict[str, float]]] = {w: [] for w in who_all}
    for r in range(rounds):
        with _broker(d, f"drain-{r}") as b:
            ids = {w: f"drain-{w.replace('_', '-')}-{r}" for w in who_all}
            _drain.prequeue(b, list(ids.values()), n, procs)
            k = r % len(who_all)
            for who in who_all[k:] + who_all[:k]:
                if who == "mosquitto_sub":
                    m = _drain.drain_mosquitto_sub(b, ids[who], n)
                    # mosquitto_sub exits on its n-th message, sometimes before its last
                    # PUBACKs are written: counted, and its time is still exec -> exit
                    m["unacked_at_exit"] = _drain.queue_left(b, ids[who])
                else:
                    cfg = _drain_config(d, b, ids[who])
                    trace = d / f"trace-drain-{who}-{r}.jsonl"
                    m = _drain.drain_edgepipe(cfg, trace, n, tree=trees[who])
                    left = _drain.queue_left(b, ids[who])
                    if left:
                        raise RuntimeError(f"round {r}: {who} left {left} messages unacked")
                runs[who].append(m)
    median = {k: {f: statistics.median(m[f] for m in ms) for f in ms[0]} for k, ms in runs.items()}

    def ratios(a: str, b: str, field: str = "msg_per_s") -> list[float]:
        return [x[field] / y[field] for x, y in zip(runs[a], runs[b], strict=True)]

    out: dict[str, Any] = {
        "rounds": rounds,
        "median": median,
        "ratio_median": statistics.median(ratios("edgepipe", "mosquitto_sub")),
        "ratios": ratios("edgepipe", "mosquitto_sub"),
        "runs": runs,
        "load_average": os.getloadavg(),
    }
    if other:
        out["base_tree"] = str(other)
        out["against_base"] = ratios("edgepipe", "base")
        out["against_base_median"] = statistics.median(out["against_base"])
        steady = ratios("edgepipe", "base", "steady_msg_per_s")
        out["against_base_steady_median"] = statistics.median(steady)
    return out


def _print_drain(r: dict[str, Any]) -> None:
    m = r["median"]
    s, e = m["mosquitto_sub"], m["edgepipe"]
    print(
        f"\nbacklog drain, {r['messages']:,} QoS 1 messages queued for a persistent session, "
        f"{r['cpu_count']} CPUs, median of {r['rounds']} rounds (load {r['load_average'][0]:.1f})"
    )
    print(f"{'':44}{'seconds':>9}{'msg/s':>10}{'CPU us/msg':>12}{'steady msg/s':>14}")
    rows = [("mosquitto_sub -q 1 (exec -> exit)", s), ("edgepipe run (exec -> last ack)", e)]
    if "base" in m:
        rows.append((f"{r['base_tree']} (exec -> last ack)"[-44:], m["base"]))
    for label, x in rows:
        steady = f"{x['steady_msg_per_s']:>14,.0f}" if "steady_msg_per_s" in x else ""
        print(
            f"{label:44}{x['seconds']:>9.2f}{x['msg_per_s']:>10,.0f}"
            f"{x['cpu_us_per_msg']:>12.1f}{steady}"
        )
    print(
        f"edgepipe against mosquitto_sub: {r['ratio_median']:.2f}x (per round "
        + ", ".join(f"{x:.2f}" for x in r["ratios"])
        + f"); edgepipe from its first commit to its last {e['steady_msg_per_s']:,.0f} msg/s, "
        f"start-up to first commit {e['start_to_first_commit_s'] * 1000:.0f} ms, "
        f"{e['batches']:.0f} batches, peak RSS {e['peak_rss_mb']:.1f} MB"
    )
    if "base" in m:
        print(
            f"this tree against the base: {r['against_base_median']:.2f}x exec -> last ack "
            "(per round " + ", ".join(f"{x:.2f}" for x in r["against_base"]) + "), "
            f"{r['against_base_steady_median']:.2f}x first -> last commit; peak RSS "
            f"{e['peak_rss_mb']:.1f} MB against {m['base']['peak_rss_mb']:.1f} MB"
        )


def _print_cgroup(r: dict[str, Any]) -> None:
    from ._cgroup import trial_line

    print(
        f"\nedgepipe under a hard memory limit ({r['cgroup']}), drain of {r['messages']:,} "
        f"messages, each trial {r['rounds']} pairs of an unlimited and a limited run, "
        "rates from the first commit to the last"
    )
    for t in r["trials"]:
        print(f"  {trial_line(t)}")
    print(
        f"smallest limit sustaining >= {r['threshold']:.0%} of the unlimited rate: "
        f"{r['min_limit_mb']} MiB (peak RSS unlimited {r['unlimited_peak_rss_mb']:.1f} MB)"
    )


def _print(r: dict[str, Any]) -> None:
    print(
        f"\nedgepipe end-to-end, {r['messages']:,} messages, {r['publishers']} publisher "
        f"processes ({r['publisher']}), {r['cpu_count']} CPUs, Python {r['python']}"
    )
    print(f"{'':34}{'msg/s':>10}{'vs bare':>9}{'peak RSS':>10}{'batch':>8}{'CPU us/msg':>12}")
    ms = r["mosquitto_sub_q1"]
    print(f"{'mosquitto_sub -q 1 (the ceiling)':34}{ms['msg_per_s']:>10,.0f}")
    for qos in (1, 0):
        b, e = r[f"bare_q{qos}"], r[f"edge_q{qos}"]
        print(f"{f'bare paho subscriber, QoS {qos}':34}{b['msg_per_s']:>10,.0f}{'':>9}")
        ratio = e["msg_per_s"] / b["msg_per_s"] if b["msg_per_s"] else float("nan")
        print(
            f"{f'edgepipe (3 Wasm stages, AES), QoS {qos}':34}{e['msg_per_s']:>10,.0f}"
            f"{ratio:>8.0%} {e['peak_rss_mb']:>8.1f}MB{e['mean_batch']:>8.0f}"
            f"{e['cpu_us_per_msg']:>12.1f}"
        )
    lat = r["latency_1000"]
    print(
        f"\npublish -> durable commit at 1,000 msg/s, median of {lat['runs']} runs: p50 "
        f"{lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms "
        f"({lat['readings']:,.0f} readings a run; peak RSS {lat['peak_rss_mb']:.1f} MB); p99 "
        "of each run: " + ", ".join(f"{m['p99_ms']:.1f}" for m in lat["each"]) + " ms"
    )
    cs = r["cold_start"]
    print(f"compiling the chain once (first start of a device): {r['aot_compile_ms']:.0f} ms")
    print(
        f"cold start (median of {cs['runs']}): exec -> subscribed "
        f"{cs['exec_to_subscribed_ms']:.0f} ms, exec -> first reading stored "
        f"{cs['exec_to_first_commit_ms']:.0f} ms"
    )
    for k, label in (("chain", "with the 3-stage Wasm chain"), ("no_chain", "with no chain")):
        m = r["idle_rss"][k]
        print(
            f"idle RSS {label}: {m['vmrss_mb']:.1f} MB "
            f"({m['rssanon_mb']:.1f} anonymous, {m['rssfile_mb']:.1f} file-backed)"
        )


def _print_tls(r: dict[str, Any]) -> None:
    m = r["median"]
    print(
        f"\nedgepipe over TLS against plain TCP, {r['messages']:,} messages, {r['publishers']} "
        f"publisher processes, {r['cpu_count']} CPUs, Python {r['python']}, median of "
        f"{r['repeats']}"
    )
    print(
        f"{'':34}{'plain msg/s':>12}{'TLS msg/s':>11}{'TLS/plain':>10}{'vs bare':>9}"
        f"{'RSS plain':>11}{'RSS TLS':>9}"
    )
    for qos in (1, 0):
        for who, label in (("bare", "bare paho subscriber"), ("edge", "edgepipe (3 Wasm, AES)")):
            p, t = m[f"{who}_plain_q{qos}"], m[f"{who}_tls_q{qos}"]
            line = (
                f"{f'{label}, QoS {qos}':34}{p['msg_per_s']:>12,.0f}{t['msg_per_s']:>11,.0f}"
                f"{t['msg_per_s'] / p['msg_per_s']:>10.0%}"
            )
            if who == "edge":
                bare = m[f"bare_tls_q{qos}"]["msg_per_s"]
                line += (
                    f"{t['msg_per_s'] / bare:>9.0%}{p['peak_rss_mb']:>9.1f}MB"
                    f"{t['peak_rss_mb']:>7.1f}MB"
                )
            print(line)


if __name__ == "__main__":
    sys.exit(main())
