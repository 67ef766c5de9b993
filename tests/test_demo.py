"""`edgepipe demo` runs the whole path on loopback and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _numbers(out: str) -> dict[str, int]:
    """The final status block (printed after every edge stopped)."""
    block = out[out.rindex("at exit") :].split("\n  aq-")[0]
    pairs = re.findall(
        r"(published|received|filtered out|dead-lettered|in flight|created by stages|stored"
        r"|synced|backlog|dead letters) ([\d,]+)",
        block,
    )
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
    # the receiver and the three edges (and mosquitto) are children of the demo once it runs
    want = 5 if broker == "mosquitto" else 4

    def running() -> list[int] | None:
        k = _children_of(proc.pid)
        return k if len(k) >= want else None

    kids = wait_for(running, 60, "demo children")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    n = _numbers(out)
    assert n["published"] > 0
    assert n["received"] == n["published"] * 13, out  # 13 metrics per sample
    # the window stage's aggregates (flushed at shutdown, and whenever a 10-minute window
    # closes during the run) are created by a stage: stored, and synced before the exit
    assert n["created by stages"] > 0, out
    assert (
        n["received"]
        == n["filtered out"]
        + n["dead-lettered"]
        + n["in flight"]
        + n["stored"]
        - n["created by stages"]
    ), out
    assert n["synced"] == n["stored"] and n["backlog"] == 0, out
    assert "(adds up)" in out and "OFF BY" not in out
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
        [sys.executable, "-m", "pipeline", "demo", "--rate", "5", "--temp"],
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
    # --temp: the work directory is gone
    workdir = Path(re.search(r"work dir\s+(\S+)", buf + out).group(1))  # type: ignore[union-attr]
    assert not workdir.exists()


def test_demo_continues_in_its_kept_directory(tmp_path):
    """A second demo in the same directory reuses the devices' keys, secrets and stores, and
    gives the operator a new password (the old one stops working)."""
    work = tmp_path / "demo"

    def demo() -> str:
        r = subprocess.run(
            [sys.executable, "-m", "pipeline", "demo", "--devices", "1", "--duration", "2"]
            + ["--rate", "5", "--dir", str(work)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    first, second = demo(), demo()
    pw = [re.search(r"password (\S+)", o).group(1) for o in (first, second)]  # type: ignore[union-attr]
    assert pw[0] != pw[1] and len(pw[1]) >= 20
    key = (work / "aq-01" / "store.key").read_text()
    assert "everything is kept in" in second and key
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "status",
            "--json",
            "-c",
            str(work / "aq-01" / "pipeline.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    st = json.loads(r.stdout)
    stored = [_numbers(o)["stored"] for o in (first, second)]
    assert st["store"]["readings"] == sum(stored)
    assert st["sync"]["backlog_readings"] == 0


def test_demo_refuses_bad_options(tmp_path):
    for args in (["--devices", "0"], ["--devices", "11"], ["--rate", "0"]):
        r = subprocess.run(
            [sys.executable, "-m", "pipeline", "demo", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert r.returncode == 2, args
        assert "--devices in 1..10" in r.stdout
    assert list(tmp_path.iterdir()) == []
