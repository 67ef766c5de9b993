"""``edgepipe demo``: the whole data path on loopback, with one command.

Starts, in a scratch directory: a broker (mosquitto if installed, else the embedded
pure-Python one), a cloud receiver (if the ``cloud`` extra is installed) with a freshly
registered device, a store key, the pipeline from the example ``pipeline.yaml`` (its
filter chain included) as a real ``edgepipe run`` child process, and simulated sensors
replaying the UCI air-quality data set.  Prints one live status line; Ctrl-C (or
``--duration``) stops everything and leaves nothing running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from devtools import _dataset as dataset
from devtools._mosquitto import Mosquitto, free_port, mosquitto_binary

__all__ = ["Demo", "load_rows"]

PKG = Path(__file__).resolve().parent
REPO = PKG.parent


def load_rows(path: Path) -> list[dict[str, float]]:
    return [
        dict(zip(dataset.METRICS, values, strict=True)) for _, values in dataset.read_rows(path)
    ]


def example_config() -> Path:
    for cand in (REPO / "pipeline.yaml", Path.cwd() / "pipeline.yaml"):
        if cand.exists():
            return cand
    raise FileNotFoundError("the example pipeline.yaml was not found next to the package")


class _Sensors(threading.Thread):
    """Devices replaying the data set: one JSON message per sample, 13 metrics each."""

    def __init__(
        self, host: str, port: int, rows: list[dict[str, float]], devices: int, rate: float
    ) -> None:
        super().__init__(name="sensors", daemon=True)
        self.host, self.port, self.rows = host, port, rows
        self.devices = [f"aq-{i + 1:02d}" for i in range(devices)]
        self.rate = rate
        self.sent = 0
        self.stop_evt = threading.Event()

    def run(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"demo-sensors-{os.getpid()}",
        )
        c.max_inflight_messages_set(200)
        while not self.stop_evt.is_set():
            try:
                c.connect(self.host, self.port)
                break
            except OSError:
                time.sleep(0.2)
        c.loop_start()
        i, t0 = 0, time.monotonic()
        period = 1.0 / self.rate
        try:
            while not self.stop_evt.is_set():
                for k, dev in enumerate(self.devices):
                    row = self.rows[(i + k * 997) % len(self.rows)]
                    body = {"ts": round(time.time(), 3), **row}
                    c.publish(f"air/{dev}", json.dumps(body), qos=1)
                    self.sent += 1
                i += 1
                delay = t0 + i * period - time.monotonic()
                if delay > 0:
                    self.stop_evt.wait(delay)
        finally:
            c.loop_stop()
            c.disconnect()


class Demo:
    def __init__(
        self,
        *,
        workdir: Path | None = None,
        rate: float = 10.0,
        devices: int = 3,
        duration: float | None = None,
        keep: bool = False,
        out: Any = None,
        broker: str = "auto",
    ) -> None:
        self.rate, self.devices, self.duration, self.keep = rate, devices, duration, keep
        self.broker_kind = broker
        self._receiver_url: str | None = None
        self._rx: Any = None
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="edgepipe-demo-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = out or sys.stdout
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self.final: dict[str, float] = {}

    @property
    def use_mosquitto(self) -> bool:
        if self.broker_kind == "mosquitto":
            return True
        return self.broker_kind == "auto" and mosquitto_binary() is not None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- pieces -----------------------------------------------------------------------
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
        self.say(f"  broker      {kind} on {b.host}:{b.port}")
        try:
            yield b
        finally:
            b.close()

    def _spawn(
        self,
        args: list[str],
        log: str,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        logf = open(self.dir / log, "ab")
        p = subprocess.Popen(
            args,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=str(self.dir),
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        logf.close()
        self._procs.append(p)
        return p

    def _receiver(self) -> tuple[str, str] | None:
        try:
            import uvicorn  # noqa: F401

            import cloud._local  # noqa: F401
            import cloud.cli  # noqa: F401
        except ImportError:
            self.say(
                "  receiver    not started: install the cloud extra (pip install "
                "'edgepipe[cloud]') to see readings arrive in the cloud"
            )
            return None
        from cloud._local import LocalReceiver

        self._rx = LocalReceiver(
            f"sqlite:///{self.dir / 'cloud.db'}", log=self.dir / "receiver.log"
        )
        secret = self._rx.add_device("aq-gateway-01")
        self._rx.start()
        self.say(f"  receiver    {self._rx.url}  (data in {self.dir / 'cloud.db'})")
        return self._rx.url, secret

    def _config(self, broker: Any, receiver: tuple[str, str] | None, metrics_port: int) -> Path:
        from storage import generate_key_line

        src = example_config()
        cfg = yaml.safe_load(src.read_text())
        key = self.dir / "store.key"
        key.write_text(generate_key_line() + "\n")
        key.chmod(0o600)
        cfg["broker"].update(
            host=broker.host, port=broker.port, client_id=f"edgepipe-demo-{os.getpid()}"
        )
        cfg["store"].update(path=str(self.dir / "store.db"), key={"file": str(key)})
        for stage in cfg.get("chain", []):
            stage["module"] = str((src.parent / stage["module"]).resolve())
        if receiver is None:
            cfg["sync"] = {"enabled": False}
        else:
            cfg["sync"].update(url=receiver[0], device_secret=receiver[1], interval_s=1.0)
        cfg["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
        path = self.dir / "pipeline.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        path.chmod(0o600)  # it holds the device secret
        return path

    # -- run --------------------------------------------------------------------------
    def run(self) -> int:
        dataset_path = dataset.find_dataset()
        rows = load_rows(dataset_path)
        self.say(f"edgepipe demo in {self.dir}")
        self.say(
            f"  data        {dataset_path.name}: {len(rows)} samples x 13 metrics, "
            f"{self.devices} simulated devices at {self.rate:g} samples/s each"
        )
        prev = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in prev:
            signal.signal(s, lambda *_: self._stop.set())
        sensors = None
        try:
            with self._broker() as broker:
                receiver = self._receiver()
                self._receiver_url = receiver[0] if receiver else None
                mport = free_port()
                cfg = self._config(broker, receiver, mport)
                edge = self._spawn(
                    [sys.executable, "-m", "pipeline", "run", "-c", str(cfg)], "edgepipe.log"
                )
                _wait_http(f"http://127.0.0.1:{mport}/readyz", 30, proc=edge)
                self.say(f"  edgepipe    pid {edge.pid}, metrics http://127.0.0.1:{mport}/metrics")
                self.say("  Ctrl-C stops everything.\n")
                sensors = _Sensors(broker.host, broker.port, rows, self.devices, self.rate)
                sensors.start()
                t_end = time.monotonic() + self.duration if self.duration else None
                while not self._stop.is_set():
                    if t_end is not None and time.monotonic() >= t_end:
                        break
                    if edge.poll() is not None:
                        self.say(
                            f"\nedgepipe exited with {edge.returncode}; see "
                            f"{self.dir / 'edgepipe.log'}"
                        )
                        return 1
                    self._status(mport, sensors.sent)
                    self._stop.wait(1.0)
                sensors.stop_evt.set()
                sensors.join(5)
                # let the last batches commit and sync before stopping
                self._settle(mport, sensors.sent)
                self.final = self._status(mport, sensors.sent)
                print(file=self.out)
                edge.send_signal(signal.SIGTERM)
                code = edge.wait(60)
                self.say(f"stopped (edgepipe exit code {code})")
                return 0 if code == 0 else 1
        finally:
            if sensors is not None:
                sensors.stop_evt.set()
            for p in self._procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            if self._rx is not None:
                self._rx.stop()
            for s, h in prev.items():
                signal.signal(s, h)
            if self._own_dir and not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
            elif self.keep:
                self.say(f"kept {self.dir}")

    def _settle(self, port: int, sent: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = scrape(port)
            synced_all = self._receiver_url is None or m.get(
                "edgepipe_readings_synced_total", 0
            ) >= m.get("edgepipe_readings_stored_total", 0)
            if m.get("edgepipe_messages_acked_total", 0) >= sent and synced_all:
                return
            time.sleep(0.5)

    def _status(self, port: int, sent: int) -> dict[str, float]:
        m = scrape(port)
        received = m.get("edgepipe_readings_in_total", 0)
        stored = m.get("edgepipe_readings_stored_total", 0)
        dropped = m.get("edgepipe_readings_dropped_total", 0)
        emitted = m.get("edgepipe_readings_emitted_total", 0)
        line = (
            f"\r{datetime.now():%H:%M:%S}  published {sent:,} msgs | received {received:,.0f} "
            f"readings | filtered out {dropped:,.0f} | aggregates {emitted:,.0f} | "
            f"stored {stored:,.0f} | synced "
            f"{m.get('edgepipe_readings_synced_total', 0):,.0f} | backlog "
            f"{m.get('edgepipe_sync_backlog_readings', 0):,.0f} | dead letters "
            f"{m.get('edgepipe_dead_letters_total', 0):,.0f}   "
        )
        self.out.write(line)
        self.out.flush()
        return {**m, "published": sent}


def scrape(port: int) -> dict[str, float]:
    """Sum each metric over its labels from an edge process's /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


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
