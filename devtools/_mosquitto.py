"""A private mosquitto broker on a free loopback port (for the demo, tests and bench/).

The configuration carries the settings edgepipe needs: ack-after-commit keeps up to a
batch of QoS 1 messages unacknowledged, so mosquitto's default in-flight window of 20
would throttle it to a crawl; the queue limits let the broker hold a long outage's
worth of messages for edgepipe's persistent session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["EDGEPIPE_BROKER_SETTINGS", "Mosquitto", "free_port", "mosquitto_binary"]

#: The broker settings edgepipe needs (also in k3s/ and docs/).
EDGEPIPE_BROKER_SETTINGS = """\
# edgepipe acknowledges QoS 1 messages only after they are durably committed, one batch
# at a time: allow a whole batch (and the next one filling) in flight per client.
max_inflight_messages 1000
# While edgepipe is down the broker queues for its persistent session.
max_queued_messages 200000
max_queued_bytes 0
# Send each message at once (no Nagle): edgepipe acknowledges in batches, and Nagle would
# hold messages back until the previous segment is acknowledged.
set_tcp_nodelay true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )


class Mosquitto:
    """``with Mosquitto() as broker: ... broker.port ...``; ``restart()`` keeps the data."""

    def __init__(
        self,
        *,
        port: int | None = None,
        extra: str = "",
        persistence: bool = True,
        workdir: str | Path | None = None,
        anonymous: bool = True,
    ) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="edgepipe-mosquitto-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        listener = f"listener {self.port} 127.0.0.1\n" if "listener" not in extra else ""
        # as root mosquitto would drop to user 'mosquitto', which cannot write the private
        # directory: no persistence file and no log
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            listener = "user root\n" + listener
        self.conf.write_text(
            listener
            + f"allow_anonymous {'true' if anonymous else 'false'}\n"
            + (
                f"persistence true\npersistence_location {self.dir}/\nautosave_interval 1\n"
                if persistence
                else "persistence false\n"
            )
            + EDGEPIPE_BROKER_SETTINGS
            + f"log_dest file {self.log}\nlog_type error\nlog_type warning\n"
            + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"mosquitto exited: {err.strip()} {log.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
