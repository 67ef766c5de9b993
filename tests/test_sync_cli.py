"""``edgepipe sync --now`` and the sync section of ``edgepipe status``, as processes."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

from core._progress import Progress
from devtools._mosquitto import free_port
from tests.helpers.sync_env import Receiver, edgepipe, fill_sync, unsynced, write_pipeline


def fake_wifi(tmp: Path) -> dict:
    d = tmp / "sys" / "class" / "net" / "wlan0"
    d.mkdir(parents=True)
    (d / "operstate").write_text("up\n")
    (d / "carrier").write_text("1\n")
    return {"sysfs_root": str(tmp / "sys")}


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``edgepipe ARGS`` to the end.  What these tests check in its stderr is the command's
    report to the operator at the terminal (progress, why it failed, what waits): the text
    is the feature; the outcome itself is checked in the store, the receiver and status."""
    p = edgepipe(*args)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())


def status(config: Path) -> dict:
    r = run("status", "-c", str(config), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["sync"]


def test_sync_now_drains_and_status_shows_it(tmp_path: Path, receiver: Receiver) -> None:
    total = fill_sync(tmp_path, 30, 1000)
    config = write_pipeline(tmp_path, receiver.url, receiver.secret, links=fake_wifi(tmp_path))
    before = status(config)
    assert before["backlog_readings"] == total and before["last_success_ms"] is None
    r = run("sync", "--now", "-c", str(config))
    assert r.returncode == 0, r.stderr
    assert f"synced {total:,}/{total:,} readings" in r.stderr  # not a tty: plain lines
    assert "backlog drained" in r.stderr
    c = receiver.counts()
    assert c["readings"] == c["distinct"] == total
    assert unsynced(tmp_path) == (0, 0)
    after = status(config)
    assert after["backlog_batches"] == 0 and after["backlog_readings"] == 0
    assert after["last_success_ms"] is not None and after["last_error"] is None
    assert after["link"] == "wifi (wlan0)"
    assert after["sent_today_wifi_bytes"] > 0 and after["sent_today_cellular_bytes"] == 0
    assert after["readings_sent_total"] == total
    text = run("status", "-c", str(config)).stdout
    assert "sync:" in text and "sent today wifi bytes" in text
    assert receiver.secret not in text + r.stderr + r.stdout


def test_sync_now_unreachable_exits_1(tmp_path: Path) -> None:
    fill_sync(tmp_path, 3, 100)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = write_pipeline(tmp_path, url, "cd" * 32, links=fake_wifi(tmp_path))
    r = run("sync", "--now", "-c", str(config))
    assert r.returncode == 1
    assert "sync failed: cannot reach http://127.0.0.1:" in r.stderr
    assert "cd" * 32 not in r.stderr
    assert unsynced(tmp_path) == (3, 300)
    st = status(config)
    assert "cannot reach" in st["last_error"] and st["last_error_at_ms"] is not None
    assert st["backlog_batches"] == 3 and st["online"] is False


def test_sync_now_refused_exits_1_with_reason(tmp_path: Path, receiver: Receiver) -> None:
    fill_sync(tmp_path, 2, 100)
    config = write_pipeline(tmp_path, receiver.url, "ef" * 32, links=fake_wifi(tmp_path))
    r = run("sync", "--now", "-c", str(config))
    assert r.returncode == 1
    assert "401 bad_signature" in r.stderr
    assert receiver.counts()["readings"] == 0 and unsynced(tmp_path) == (2, 200)


def test_sync_now_when_no_link_is_up(tmp_path: Path, receiver: Receiver) -> None:
    fill_sync(tmp_path, 1, 10)
    links = fake_wifi(tmp_path)
    (tmp_path / "sys" / "class" / "net" / "wlan0" / "operstate").write_text("down\n")
    config = write_pipeline(tmp_path, receiver.url, receiver.secret, links=links)
    r = run("sync", "--now", "-c", str(config))
    assert r.returncode == 1
    assert "no network link is up (wlan0 (wifi) down)" in r.stderr


def test_sync_now_metered_reports_what_waits(tmp_path: Path, receiver: Receiver) -> None:
    fill_sync(tmp_path, 2, 10)  # old data: bulk
    d = tmp_path / "sys" / "class" / "net" / "wwan0"
    d.mkdir(parents=True)
    (d / "operstate").write_text("up\n")
    config = write_pipeline(
        tmp_path, receiver.url, receiver.secret, links={"sysfs_root": str(tmp_path / "sys")}
    )
    r = run("sync", "--now", "-c", str(config))
    assert r.returncode == 1
    assert "20 readings in 2 batches not sent" in r.stderr
    assert "bulk batches wait for an unmetered link" in r.stderr


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal() -> None:
    out = _Tty()
    p = Progress(1000, out)
    p(500)
    p(1000)
    p.finish()
    text = out.getvalue()
    assert "\r[" in text and "100.0%" in text and "1,000/1,000 readings" in text
    assert text.endswith("\n")
    quiet = _Tty()
    Progress(10, quiet, quiet=True)(10)
    assert quiet.getvalue() == ""
