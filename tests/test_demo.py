"""`edgepipe demo` runs the whole path on loopback and leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.edge import REPO, wait_for


def _children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append(int(d))
    return out


def _numbers(line: str) -> dict[str, int]:
    pairs = re.findall(
        r"(published|received|filtered out|aggregates|stored|synced|backlog|dead letters) "
        r"([\d,]+)",
        line,
    )
    # "received N readings" has the word order "received 1,234 readings"
    return {k: int(v.replace(",", "")) for k, v in pairs}


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_demo_flows_and_stops_cleanly(tmp_path, broker):
    if broker == "embedded":
        pytest.importorskip("devtools._minibroker")
    work = tmp_path / "demo"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "demo",
            "--duration",
            "6",
            "--rate",
            "20",
            "--dir",
            str(work),
            "--broker",
            broker,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    # the receiver and the pipeline (and mosquitto) are children of the demo once it runs
    want = 3 if broker == "mosquitto" else 2

    def running() -> list[int] | None:
        k = _children_of(proc.pid)
        return k if len(k) >= want else None

    kids = wait_for(running, 60, "demo children")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last = [seg for seg in out.split("\r") if "published" in seg][-1]
    n = _numbers(last)
    assert n["published"] > 0
    assert n["received"] == n["published"] * 13  # 13 metrics per sample
    # the window stage emits aggregates whenever a 10-minute window (wall clock here)
    # closes during the run
    assert n["stored"] + n["filtered out"] == n["received"] + n["aggregates"], last
    assert n["synced"] == n["stored"], last
    assert "stopped (edgepipe exit code 0)" in out
    assert ("embedded pure-Python broker" in out) == (broker == "embedded")
    # broker, receiver and pipeline are gone
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"process {pid} left running"


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_demo_ctrl_c(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "demo", "--rate", "5", "--dir", str(tmp_path / "d")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    deadline = time.time() + 60
    buf = ""
    assert proc.stdout is not None
    while "published" not in buf and time.time() < deadline:
        buf += proc.stdout.read(1)
    kids = _children_of(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, buf + out
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)
