"""Backlog drain: a broker holding N QoS 1 messages for a persistent session, and the time
until a consumer that connects to that session has acknowledged all of them.

The measurement behind ``python -m bench.e2e --drain`` (edgepipe next to
``mosquitto_sub -q 1``) and ``python -m bench.e2e --cgroup`` (edgepipe under a hard memory
limit):

- :func:`prequeue` creates the sessions (MQTT 5, ``clean_start`` false, a day's session
  expiry, ``bench/+/+`` at QoS 1), disconnects them and publishes the same N JSON messages
  (bench/_load.py) once: the broker queues a copy for every session, and acknowledges each
  publish only after queueing it;
- :func:`drain_mosquitto_sub` times ``mosquitto_sub -q 1 -c -i ID -C N`` from exec to exit
  (it acknowledges each message as it reads it and exits after the N-th -- at times
  before its last PUBACKs are written, which :func:`queue_left` then counts: its time is
  an upper bound of its rate);
- :func:`drain_edgepipe` times ``edgepipe run`` (the example's 3 Wasm stages, AES-GCM,
  ``synchronous=FULL``) from exec until its commit trace (``EDGEPIPE_TRACE_COMMITS``, one
  line per commit, written right before that batch's PUBACKs go out in the same event-loop
  step) adds up to N messages;
- :func:`queue_left` then proves the session's queue is empty: it resumes the session and
  publishes a marker behind whatever is left; the messages that arrive before the marker
  are the ones the consumer did not acknowledge (for edgepipe 0, or the run does not
  count).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from devtools._mosquitto import Mosquitto

from ._load import run_publishers

__all__ = [
    "compile_bytecode",
    "cpu_seconds",
    "drain_edgepipe",
    "drain_mosquitto_sub",
    "prequeue",
    "queue_left",
]

TOPIC_FILTER = "bench/+/+"
SESSION_EXPIRY = 86400  # edgepipe's default broker.session_expiry
REPO = Path(__file__).resolve().parents[1]
EDGE_PACKAGES = ("core", "protocol", "config", "pipeline", "storage", "sync")


def compile_bytecode(tree: Path = REPO) -> None:
    """Compile the edge's packages of ``tree`` to bytecode, as installed (pip and the
    Containerfile do): with ``PYTHONDONTWRITEBYTECODE`` set and no bytecode, every start
    would compile edgepipe's sources again (~60 ms here, part of no device's start)."""
    import compileall

    for pkg in EDGE_PACKAGES:
        compileall.compile_dir(tree / pkg, quiet=1)


def _session(broker: Mosquitto, client_id: str, subscribe: bool) -> Any:
    """A paho MQTT 5 client resuming (or creating) the persistent session ``client_id``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    if subscribe:
        c.on_connect = lambda cl, *a: cl.subscribe(TOPIC_FILTER, qos=1)
    c.connect(broker.host, broker.port, clean_start=False, properties=props)
    c.loop_start()
    if subscribe and not subscribed.wait(10):
        raise RuntimeError(f"{client_id}: no SUBACK")
    return c


def prequeue(broker: Mosquitto, client_ids: list[str], n: int, publishers: int = 2) -> float:
    """Create the persistent sessions ``client_ids``, leave them offline, and publish ``n``
    QoS 1 messages each of them holds; returns the publishing time in seconds."""
    for cid in client_ids:
        c = _session(broker, cid, subscribe=True)
        c.disconnect()
        c.loop_stop()
    return run_publishers(broker.host, broker.port, n, procs=publishers, qos=1, raw=True)


def queue_left(broker: Mosquitto, client_id: str, timeout: float = 60) -> int:
    """How many messages the broker still holds for the offline session ``client_id``
    (resumes it, and counts what arrives before a marker published behind them)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got = {"n": 0}
    done = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == "bench/marker/end":
            done.set()
        else:
            got["n"] += 1

    c = _session(broker, client_id, subscribe=False)
    c.on_message = on_message
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="drain-marker")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    pub.publish("bench/marker/end", b"end", qos=1).wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()
    ok = done.wait(timeout)
    c.disconnect()
    c.loop_stop()
    if not ok:
        raise RuntimeError(f"{client_id}: the marker did not arrive")
    return got["n"]


def mosquitto_sub() -> str:
    path = shutil.which("mosquitto_sub")
    if path is None:
        raise FileNotFoundError(
            "mosquitto_sub is not installed (apt-get install mosquitto-clients)"
        )
    return path


def drain_mosquitto_sub(broker: Mosquitto, client_id: str, n: int) -> dict[str, float]:
    """``mosquitto_sub -q 1 -c -i ID -C n`` on the queued session: exec to exit."""
    cmd = [
        mosquitto_sub(),
        "-h",
        broker.host,
        "-p",
        str(broker.port),
        "-V",
        "5",
        "-q",
        "1",
        "-c",
        "-x",
        str(SESSION_EXPIRY),
        "-i",
        client_id,
        "-t",
        TOPIC_FILTER,
        "-C",
        str(n),
    ]
    t0 = time.perf_counter()
    cpu0 = os.times()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    dt = time.perf_counter() - t0
    cpu1 = os.times()
    if p.returncode != 0:
        raise RuntimeError(f"mosquitto_sub exited {p.returncode}: {p.stderr.decode()[:200]}")
    cpu = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
    return {"messages": n, "seconds": dt, "msg_per_s": n / dt, "cpu_us_per_msg": cpu / n * 1e6}


def drain_edgepipe(
    config: Path,
    trace: Path,
    n: int,
    *,
    preexec: Any = None,
    timeout: float = 600,
    tree: Path = REPO,
) -> dict[str, float]:
    """``edgepipe run -c config`` on the queued session: exec until its commits add up to
    ``n`` messages (each batch is acknowledged right after its commit is traced); also the
    rate from its first commit to its last (start-up excluded), its CPU time per message
    and its peak RSS.  ``preexec`` runs in the child before exec (e.g. joining a cgroup);
    ``tree`` is the checkout whose edgepipe runs (from its sources, ``PYTHONPATH``).
    A process that dies before the end (e.g. killed by the OOM killer) raises."""
    compile_bytecode(tree)
    trace.unlink(missing_ok=True)
    env = {**os.environ, "EDGEPIPE_TRACE_COMMITS": str(trace)}
    if tree != REPO:
        env["PYTHONPATH"] = str(tree)
    t0 = time.perf_counter()
    wall0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=tree,
        preexec_fn=preexec,
    )
    deadline = t0 + timeout
    got, commits, pos = 0, [], 0
    hwm = 0
    try:
        while got < n:
            if proc.poll() is not None:
                raise RuntimeError(f"edgepipe exited {proc.returncode} after {got} of {n}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"edgepipe acknowledged {got} of {n} in {timeout} s")
            hwm = max(hwm, _vm_hwm(proc.pid))
            if trace.exists():
                with trace.open() as f:
                    f.seek(pos)
                    chunk = f.read()
                end = chunk.rfind("\n") + 1
                pos += end
                for line in chunk[:end].splitlines():
                    c = json.loads(line)
                    commits.append((c["t"], c["msgs"]))
                    got += c["msgs"]
            if got < n:
                time.sleep(0.002)
        hwm = max(hwm, _vm_hwm(proc.pid))
        cpu = cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    t_last = commits[-1][0]
    seconds = t_last - wall0  # exec to the last commit (wall clock of this machine)
    steady = t_last - commits[0][0]
    return {
        "messages": got,
        "seconds": seconds,
        "msg_per_s": got / seconds,
        "steady_msg_per_s": (got - commits[0][1]) / steady if steady > 0 else 0.0,
        "start_to_first_commit_s": commits[0][0] - wall0,
        "batches": len(commits),
        "cpu_us_per_msg": cpu / got * 1e6,
        "peak_rss_mb": hwm / 1024,
    }


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a running process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
