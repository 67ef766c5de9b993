"""Running ``edgepipe-cloud`` as separate processes for the tests: one command to the end
(:func:`cli`), a master key file made by the command itself, ``serve`` on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers.cloud_client import wait_serving

REPO = Path(__file__).resolve().parents[2]


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """``edgepipe-cloud ARGS`` to the end; its stderr is the operator's answer at the terminal,
    so the tests check that text (and the outcome in the database, the key file, HTTP)."""
    return subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=60,
    )


def key_file(tmp_path: Path, name: str = "master.key") -> Path:
    path = tmp_path / name
    r = cli("master-key", "generate", "--out", str(path))
    assert r.returncode == 0, r.stderr
    return path


def start_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple:
    """``edgepipe-cloud serve ARGS`` on a free port; -> (process, url, log path)."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloud.cli", "serve", "--port", str(port), *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    wait_serving(proc, url, log)
    return proc, url, log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
