"""``edgepipe demo``: the whole data path on loopback, with one command.

Starts, in a work directory (``./edgepipe-demo`` unless told otherwise; kept, and reused by
the next demo): a broker (mosquitto if installed, else the embedded pure-Python one), a
cloud receiver with its dashboard (if the ``cloud`` extra is installed) and an operator
with a fresh random password, and one edge device per simulated sensor box: its own
``pipeline.yaml`` (the example's, filter chain included), store, store key and device
secret, run as a real ``edgepipe run`` child process.  Simulated sensors replay the UCI
air-quality data set, each box on its own topic.

It prints a header with everything needed to look around (the dashboard and how to sign
in, the work directory, the ``edgepipe`` and ``edgepipe-cloud`` commands that work on these
files), then a live status in which the accounting adds up:
``received = filtered out + dead-lettered + in flight + stored - created by stages``.
Ctrl-C (or ``--duration``) stops the sensors, lets every edge commit, flush its chain and
upload, then prints the final status from the edges' counters at exit and stops everything.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from devtools import _dataset as dataset
from devtools._mosquitto import Mosquitto, free_port, mosquitto_binary

from ._demo_accounting import Totals, scrape
from ._demo_sensors import Sensors, load_rows

__all__ = ["DEFAULT_DIR", "MAX_DEVICES", "OPERATOR", "Demo", "Totals", "load_rows", "scrape"]

PKG = Path(__file__).resolve().parent
REPO = PKG.parent

#: The work directory when ``--dir`` is not given (relative to the current directory).
DEFAULT_DIR = Path("edgepipe-demo")
#: Most simulated devices (one edge process each).
MAX_DEVICES = 10
#: The dashboard operator the demo creates; its password is new on every run.
OPERATOR = "demo"
#: Seconds to wait for the edges to acknowledge what the sensors sent, before stopping them.
SETTLE_S = 30.0
#: Seconds an edge may take to stop (commit, flush its chain, final upload).
STOP_S = 60.0


def example_config() -> Path:
    for cand in (REPO / "pipeline.yaml", Path.cwd() / "pipeline.yaml"):
        if cand.exists():
            return cand
    raise FileNotFoundError("the example pipeline.yaml was not found next to the package")


@dataclass
class _Edge:
    """One simulated device: its directory, config and ``edgepipe run`` process."""

    name: str
    dir: Path
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.dir / "pipeline.yaml"

    @property
    def at_exit(self) -> Path:
        return self.dir / "metrics-at-exit.prom"

    @property
    def secret_file(self) -> Path:
        return self.dir / "device.secret"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


class Demo:
    def __init__(
        self,
        *,
        workdir: Path | None = None,
        temp: bool = False,
        rate: float = 10.0,
        devices: int = 3,
        duration: float | None = None,
        out: TextIO | None = None,
        broker: str = "auto",
    ) -> None:
        if not 1 <= devices <= MAX_DEVICES:
            raise ValueError(f"devices must be 1..{MAX_DEVICES}")
        self.rate, self.duration, self.temp = rate, duration, temp
        self.broker_kind = broker
        if temp:
            self.dir = Path(tempfile.mkdtemp(prefix="edgepipe-demo-"))
        else:
            self.dir = Path(workdir or DEFAULT_DIR).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.edges = [
            _Edge(f"aq-{i + 1:02d}", self.dir / f"aq-{i + 1:02d}") for i in range(devices)
        ]
        self.out = out or sys.stdout
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self._rx: Any = None
        self._stop = threading.Event()
        self._drawn = 0
        self.final: Totals | None = None

    @property
    def use_mosquitto(self) -> bool:
        if self.broker_kind == "mosquitto":
            return True
        return self.broker_kind == "auto" and mosquitto_binary() is not None

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    @contextlib.contextmanager
    def _broker(self) -> Iterator[Any]:
        if self.use_mosquitto:
            b: Any = Mosquitto(workdir=self.dir / "broker")
            kind = "mosquitto"
        else:
            from devtools._minibroker import MiniBroker

            b = MiniBroker()
            kind = "embedded pure-Python broker" + (
                "" if self.broker_kind == "embedded" else " (mosquitto is not installed)"
            )
        b.start()
        self.broker_desc = f"{kind} on {b.host}:{b.port}"
        try:
            yield b
        finally:
            b.close()

    # -- the cloud side -----------------------------------------------------------------------
    @property
    def cloud_db(self) -> str:
        return f"sqlite:///{self.dir / 'cloud.db'}"

    @property
    def master_key(self) -> Path:
        return self.dir / "cloud-master.key"

    def _receiver(self) -> str | None:
        """Start the receiver with every device registered and the operator's password set;
        returns the password (None when the cloud extra is missing)."""
        try:
            import argon2  # noqa: F401
            import uvicorn  # noqa: F401

            from cloud._local import LocalReceiver
        except ImportError:
            return None
        from cloud import open_backend
        from cloud._auth import hash_password
        from cloud._errors import OperatorExists

        self._rx = LocalReceiver(
            self.cloud_db, log=self.dir / "receiver.log", master_key_file=self.master_key
        )
        with contextlib.closing(open_backend(self.cloud_db)) as backend:
            known = {d["name"] for d in backend.list_devices()}
        for e in self.edges:
            if e.name in known and e.secret_file.exists():
                continue  # registered by an earlier demo in this directory
            if e.name in known:
                raise RuntimeError(
                    f"{e.name} is registered in {self.dir / 'cloud.db'} but its secret "
                    f"{e.secret_file} is gone; remove {self.dir} to start over"
                )
            _write_private(e.secret_file, self._rx.add_device(e.name) + "\n")
        password = secrets.token_urlsafe(15)  # 120 random bits
        pwhash = hash_password(password)
        with contextlib.closing(open_backend(self.cloud_db)) as backend:
            try:
                backend.add_operator(OPERATOR, pwhash)
            except OperatorExists:
                backend.set_operator_hash(OPERATOR, pwhash)
        with _shielded_from_ctrl_c():
            self._rx.start()
        return password

    # -- the edges ------------------------------------------------------------------------------
    def _config(self, edge: _Edge, broker: Any, sync_url: str | None) -> None:
        from storage import generate_key_line

        src = example_config()
        cfg = yaml.safe_load(src.read_text())
        key = edge.dir / "store.key"
        if not key.exists():
            _write_private(key, generate_key_line() + "\n")
        cfg["device"] = {"id": edge.name}
        cfg["broker"].update(host=broker.host, port=broker.port)
        cfg["subscriptions"] = [
            {"topic": f"air/{edge.name}", "device": edge.name, "qos": 1},
            {"topic": f"sensors/{edge.name}/{{metric}}", "device": edge.name, "qos": 1},
        ]
        cfg["store"].update(path=str(edge.dir / "store.db"), key={"file": str(key)})
        for stage in cfg.get("chain", []):
            stage["module"] = str((src.parent / stage["module"]).resolve())
        if sync_url is None:
            cfg["sync"] = {"enabled": False}
        else:
            cfg["sync"].update(
                url=sync_url, device_secret={"file": str(edge.secret_file)}, interval_s=1.0
            )
        edge.metrics_port = free_port()
        cfg["metrics"] = {"listen": f"127.0.0.1:{edge.metrics_port}"}
        head = (
            f"# {edge.name} of `edgepipe demo`, made from {src} (rewritten at each demo:\n"
            "# broker and metrics ports change; keys, secrets and data are kept)\n"
        )
        _write_private(edge.config, head + yaml.safe_dump(cfg, sort_keys=False))

    def _spawn(self, edge: _Edge) -> None:
        edge.at_exit.unlink(missing_ok=True)
        with open(edge.dir / "edgepipe.log", "ab") as logf:
            edge.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", "-c", str(edge.config)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=str(edge.dir),
                env={**os.environ, "EDGEPIPE_METRICS_AT_EXIT": str(edge.at_exit)},
                start_new_session=True,
            )

    # -- output -----------------------------------------------------------------------------------
    def _header(self, password: str | None, rows: int, dataset_name: str) -> None:
        first = self.edges[0]
        names = ", ".join(e.name for e in self.edges)
        say = self.say
        say(f"edgepipe demo: {len(self.edges)} simulated devices ({names}), one edge each")
        say(f"  work dir    {self.dir}  (kept after exit; the next demo here continues)")
        say(
            f"  data        {dataset_name}: {rows} samples x 13 metrics, one message per "
            f"sample, {self.rate:g} samples/s per device"
        )
        say(f"  broker      {self.broker_desc}")
        for e in self.edges:
            say(
                f"  edge {e.name}  pid {e.proc.pid if e.proc else '-'}, "
                f"metrics http://127.0.0.1:{e.metrics_port}/metrics, config {e.config}"
            )
        if self._rx is None:
            say(
                "  dashboard   not started: install the cloud extra (pip install "
                "'edgepipe[cloud]') to see readings arrive in the cloud"
            )
        else:
            say(f"  dashboard   {self._rx.url}/")
            say(f"  sign in     user {OPERATOR}, password {password}  (new at every demo run)")
        say("")
        say("  look at the files (now, or after Ctrl-C):")
        say(f"    edgepipe status -c {first.config}")
        say(f"    edgepipe export -c {first.config} --format csv | head")
        if self._rx is not None:
            say(
                f"    edgepipe-cloud devices --db {self.cloud_db} "
                f"--master-key-file {self.master_key} list"
            )
            say(
                f"    edgepipe-cloud serve --db {self.cloud_db} "
                f"--master-key-file {self.master_key} --port 8750   # the dashboard again"
            )
        if len(self.edges) > 1:
            say(f"    (the other devices: the same with {self.dir}/<device>/pipeline.yaml)")
        say("")
        say(
            "  Ctrl-C stops the sensors; each edge then stores and uploads what it has "
            "(its window aggregates too) before it exits."
        )
        say("")

    def _draw(self, lines: list[str]) -> None:
        """The live status: redrawn in place on a terminal, a new block every 10 s if not."""
        if self.tty:
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            self._drawn = len(lines)
        else:
            self.out.write("".join(f"{line}\n" for line in lines))
        self.out.flush()

    def _totals(self) -> Totals:
        t = Totals()
        for e in self.edges:
            t = t + (scrape(e.metrics_port) or Totals())
        return t

    # -- run ----------------------------------------------------------------------------------------
    def run(self) -> int:
        dataset_path = dataset.find_dataset()
        rows = load_rows(dataset_path)
        prev = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in prev:
            signal.signal(s, lambda *_: self._stop.set())
        sensors = None
        try:
            with self._broker() as broker:
                password = self._receiver()
                for e in self.edges:
                    self._config(e, broker, self._rx.url if self._rx else None)
                    self._spawn(e)
                for e in self.edges:
                    assert e.proc is not None
                    _wait_http(f"http://127.0.0.1:{e.metrics_port}/readyz", 60, proc=e.proc)
                self._header(password, len(rows), dataset_path.name)
                sensors = Sensors(
                    broker.host, broker.port, rows, [e.name for e in self.edges], self.rate
                )
                sensors.start()
                code = self._live(sensors)
                sensors.stop_evt.set()
                sensors.join(10)
                if code:
                    return code
                self._settle(sensors)
                return self._shutdown(sensors.total)
        finally:
            if sensors is not None:
                sensors.stop_evt.set()
            for e in self.edges:
                _terminate(e.proc)
            if self._rx is not None:
                self._rx.stop()
            for s, h in prev.items():
                signal.signal(s, h)
            if self.temp:
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                self.say(f"everything is kept in {self.dir}; rm -r it to start over")

    def _live(self, sensors: Sensors) -> int:
        t_end = time.monotonic() + self.duration if self.duration else None
        last_block = 0.0
        while not self._stop.is_set():
            if t_end is not None and time.monotonic() >= t_end:
                break
            for e in self.edges:
                assert e.proc is not None
                if e.proc.poll() is not None:
                    self.say(
                        f"\nedgepipe of {e.name} exited with {e.proc.returncode}; see "
                        f"{e.dir / 'edgepipe.log'}"
                    )
                    return 1
            now = time.monotonic()
            if self.tty or now - last_block >= 10:
                last_block = now
                self._draw(self._totals().lines(sensors.total, f"{datetime.now():%H:%M:%S}"))
            self._stop.wait(1.0)
        return 0

    def _settle(self, sensors: Sensors) -> None:
        """Wait (bounded) until each edge acknowledged what its sensors published."""
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            if all(
                (scrape(e.metrics_port) or Totals()).acked >= sensors.sent[e.name]
                for e in self.edges
            ):
                return
            time.sleep(0.2)
        self.say("(some messages were not acknowledged yet; the broker keeps them for next time)")

    def _shutdown(self, published: int) -> int:
        """Stop the edges (each commits, flushes its chain, uploads), then the final status
        from the counters each wrote at exit."""
        self.say("\nstopping: each edge stores its last batches and window aggregates, uploads")
        for e in self.edges:
            assert e.proc is not None
            e.proc.send_signal(signal.SIGTERM)
        codes = {}
        for e in self.edges:
            assert e.proc is not None
            try:
                codes[e.name] = e.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                codes[e.name] = None
        total = Totals()
        per: list[str] = []
        for e in self.edges:
            try:
                t = Totals.parse(e.at_exit.read_text())
            except OSError:
                per.append(f"  {e.name}  no final counters ({e.at_exit} missing)")
                continue
            total = total + t
            per.append(
                f"  {e.name}  stored {t.stored:,.0f}  synced {t.synced:,.0f}  "
                f"backlog {t.backlog:,.0f}  (of which created by stages {t.created:,.0f})"
            )
        self.final = total
        self._drawn = 0
        for line in total.lines(published, "at exit "):
            self.say(line)
        for line in per:
            self.say(line)
        if self._rx is None:
            self.say("sync is off (no cloud extra): everything stays in the stores")
        elif total.backlog:
            self.say(
                f"{total.backlog:,.0f} readings are not synced yet: they upload at the next "
                f"demo, or now with: edgepipe sync --now -c {self.edges[0].config}"
            )
        else:
            self.say("everything stored is in the cloud: backlog 0")
        bad = {n: c for n, c in codes.items() if c != 0}
        if bad:
            self.say("stopped with errors: " + ", ".join(f"{n}: exit {c}" for n, c in bad.items()))
            return 1
        self.say("stopped (edgepipe exit code 0)")
        return 0


@contextlib.contextmanager
def _shielded_from_ctrl_c() -> Iterator[None]:
    """Children started in here begin with SIGINT blocked, so the terminal's Ctrl-C (sent to
    the whole foreground process group) reaches only the demo, which then stops them in
    order: the edges upload their last batches before the receiver goes."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _terminate(p: subprocess.Popen[bytes] | None) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
