"""A stop right after a burst of acknowledgements loses none of them.

A broker draining a backlog is busy sending and may leave tens of thousands of PUBACKs
unread in its socket; closing then (a SIGTERM from the kubelet right after the last commit)
used to lose them -- the broker's next write met a closed socket, the reset threw away what
it had not read, and the whole tail of the drain was sent again on the next start (skipped
as redeliveries: no loss, but the traffic again).  edgepipe now waits, before it
disconnects, for the broker's answer to a PINGREQ sent behind its last PUBACKs
(``MQTTClient._settle``).  Real mosquitto, real ``edgepipe run``, a real backlog."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import _drain
from bench.e2e import _drain_config
from devtools._mosquitto import Mosquitto

REPO = Path(__file__).resolve().parents[1]
N = 100_000


def _committed(trace: Path) -> int:
    if not trace.exists():
        return 0
    lines = trace.read_text().splitlines()
    return sum(json.loads(line)["msgs"] for line in lines if line.endswith("}"))


def test_a_stop_right_after_the_last_commit_leaves_nothing_unacknowledged(
    tmp_path: Path,
) -> None:
    with Mosquitto(workdir=tmp_path / "broker") as b:
        _drain.prequeue(b, ["edge"], N, 2)
        cfg = _drain_config(tmp_path, b, "edge")
        trace = tmp_path / "trace.jsonl"
        env = {**os.environ, "EDGEPIPE_TRACE_COMMITS": str(trace)}
        p = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "-c", str(cfg)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 300
            while _committed(trace) < N:  # observe the commits; stop soon after the last
                assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
                assert time.monotonic() < deadline, f"{_committed(trace)} of {N} committed"
                time.sleep(0.05)
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, err.decode()
        assert b"closing before the broker answered" not in err
        assert _committed(trace) == N
        # the session holds nothing more: every PUBACK reached the broker and was read
        assert _drain.queue_left(b, "edge") == 0
