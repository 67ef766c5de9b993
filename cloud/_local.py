"""A receiver in a child process on a free loopback port: ``edgepipe-cloud serve``.

Used by ``edgepipe demo``, the end-to-end tests and the benchmarks, so that all of them
run the real command line the way an operator does.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["LocalReceiver", "cli_command"]


def cli_command(*args: str) -> list[str]:
    """The ``edgepipe-cloud`` command line, independent of PATH and install layout."""
    return [sys.executable, "-m", "cloud.cli", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalReceiver:
    """``with LocalReceiver(db_url, log=path) as rx: secret = rx.add_device("d1")``.

    ``db`` is a database URL (``sqlite:///path`` or ``postgresql://...``); ``extra`` are
    more ``serve`` arguments (e.g. TLS); with ``ca`` the URL is https://localhost and the
    readiness probe verifies against that CA.  The master key that seals the device secrets
    is ``master_key_file``, by default ``cloud-master.key`` next to the log, made (0600) if
    it does not exist yet.
    """

    def __init__(
        self,
        db: str,
        *,
        log: Path,
        port: int | None = None,
        extra: list[str] | None = None,
        ca: Path | None = None,
        cwd: Path | None = None,
        master_key_file: Path | None = None,
    ) -> None:
        self.db = db
        self.port = port or _free_port()
        self.extra = list(extra or [])
        self.ca = ca
        self.log = Path(log)
        self.cwd = cwd
        self.url = f"https://localhost:{self.port}" if ca else f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.master_key_file = Path(master_key_file or self.log.parent / "cloud-master.key")

    def _key_args(self) -> list[str]:
        if not self.master_key_file.exists():
            from ._secrets import generate_master_key_line, write_new_key_file

            try:
                write_new_key_file(self.master_key_file, generate_master_key_line() + "\n")
            except FileExistsError:  # made meanwhile by another user of the directory
                pass
        return ["--master-key-file", str(self.master_key_file)]

    def add_device(self, name: str) -> str:
        """Register a device; returns its secret (hex), as ``devices add`` prints it.  The
        database is created first (``init``) if it does not exist yet."""
        subprocess.run(
            cli_command("init", "--db", self.db, *self._key_args()),
            capture_output=True,
            check=True,
            cwd=self.cwd,
        )
        out = subprocess.run(
            cli_command("devices", "--db", self.db, *self._key_args(), "add", name),
            capture_output=True,
            text=True,
            check=True,
            cwd=self.cwd,
        )
        return out.stdout.strip().splitlines()[0]

    def start(self, timeout: float = 30) -> LocalReceiver:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                cli_command(
                    "serve",
                    "--db",
                    self.db,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                    *self._key_args(),
                    *self.extra,
                ),
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
            )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the receiver did not start:\n" + self.log.read_text())
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        try:
            with urllib.request.urlopen(self.url + "/v1/ping", timeout=1, context=ctx) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s). Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    close = stop

    def __enter__(self) -> LocalReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
