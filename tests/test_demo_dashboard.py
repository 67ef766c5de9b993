"""A new user's first contact: ``edgepipe demo`` in a terminal, followed by its header alone.

The demo runs in a pseudo-terminal, in an empty directory, without options beyond a short
rate.  The test reads only what it prints: the dashboard URL and the sign-in it names (in
headless Chromium: three devices online, each with a live chart), the metrics URLs (sampled
all along, the shutdown included: the accounting adds up in every sample), then Ctrl-C as a
keystroke, the final status, and the printed ``edgepipe status`` / ``export`` /
``edgepipe-cloud`` commands run as written against the files the demo kept.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import termios
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.browser import CHROMIUM, screenshot
from tests.helpers.edge import wait_for

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists()
    or shutil.which("mosquitto") is None
    and not Path("/usr/sbin/mosquitto").exists(),
    reason="needs /usr/bin/chromium and mosquitto (CI installs them with apt)",
)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
DEVICES = ["aq-01", "aq-02", "aq-03"]


class Terminal:
    """A command on a pseudo-terminal that is its controlling terminal (Ctrl-C is a key)."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, b"\x00\x32\x00\xc8\x00\x00\x00\x00")  # 50x200
        self.proc = subprocess.Popen(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            preexec_fn=_controlling_tty,
            close_fds=True,
        )
        os.close(slave)
        self.master = master
        self._raw = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                return
            if not chunk:
                return
            self._raw += chunk

    @property
    def text(self) -> str:
        return ANSI.sub("", self._raw.decode(errors="replace")).replace("\r\n", "\n")

    def expect(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.proc.poll() is not None and not re.search(pattern, self.text):
                raise AssertionError(f"demo exited {self.proc.returncode}:\n{self.text}")
            return re.search(pattern, self.text)

        return wait_for(found, timeout, f"{pattern!r} in the demo's output")  # type: ignore[return-value]

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        os.close(self.master)


def _controlling_tty() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _metrics(url: str) -> dict[str, float] | None:
    """One scrape: the values the status identity needs, summed over labels."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = dict.fromkeys(
        ("in", "filtered", "dead", "quota", "in_flight", "stored", "emitted", "synced", "backlog"),
        0.0,
    )
    names = {
        "edgepipe_readings_in_total": "in",
        "edgepipe_readings_in_flight": "in_flight",
        "edgepipe_readings_stored_total": "stored",
        "edgepipe_readings_emitted_total": "emitted",
        "edgepipe_readings_synced_total": "synced",
        "edgepipe_sync_backlog_readings": "backlog",
    }
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0]
        if name == "edgepipe_readings_dropped_total":
            key = (
                "quota"
                if 'stage="store"' in series
                else "dead"
                if 'reason="dead_letter"' in series
                else "filtered"
            )
            out[key] += float(value)
        elif name in names:
            out[names[name]] += float(value)
    return out


class Sampler(threading.Thread):
    """Scrapes every edge's /metrics until each stops answering (the demo's shutdown)."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.samples: list[tuple[str, dict[str, float]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        live = list(self.urls)
        while live:
            for url in list(live):
                m = _metrics(url)
                if m is None:
                    live.remove(url)
                else:
                    self.samples.append((url, m))
        self.done.set()


def _identity_errors(samples: list[tuple[str, dict[str, float]]]) -> list[str]:
    bad = []
    for url, m in samples:
        # received = filtered out + dead-lettered + in flight + stored - created by stages
        if m["in"] != m["filtered"] + m["dead"] + m["in_flight"] + m["stored"] - m["emitted"]:
            bad.append(f"{url}: identity {m}")
        # the backlog: stored, not yet acknowledged (the stores start empty here)
        if m["backlog"] != m["stored"] - m["synced"] - m["quota"]:
            bad.append(f"{url}: backlog {m}")
    return bad


def _run_printed(cmd: str, cwd: Path) -> str:
    """A command exactly as the demo printed it, with this interpreter as ``edgepipe``."""
    words = shlex.split(cmd.split("|")[0].split("#")[0])
    prog = {"edgepipe": ["-m", "pipeline"], "edgepipe-cloud": ["-m", "cloud.cli"]}[words[0]]
    r = subprocess.run(
        [sys.executable, *prog, *words[1:]], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _final_numbers(text: str) -> dict[str, int]:
    block = text[text.rindex("at exit") :]
    pairs = re.findall(
        r"(published|stored|synced|backlog|received|filtered out|dead-lettered|in flight"
        r"|created by stages) ([\d,]+)",
        block.split("\n  aq-")[0],
    )
    return {k: int(v.replace(",", "")) for k, v in pairs}


def test_first_contact_demo_to_dashboard(tmp_path: Path, browser: object) -> None:
    term = Terminal([sys.executable, "-m", "pipeline", "demo", "--rate", "4"], cwd=tmp_path)
    sampler = None
    try:
        term.expect(r"Ctrl-C stops the sensors")
        header = term.text
        url = re.search(r"dashboard\s+(http://\S+?)/?\s", header).group(1)  # type: ignore[union-attr]
        sign = re.search(r"sign in\s+user (\S+), password (\S+)", header)
        assert sign is not None, header
        user, password = sign.groups()
        metrics = re.findall(r"metrics (http://\S+/metrics)", header)
        assert len(metrics) == 3, header
        workdir = Path(re.search(r"work dir\s+(\S+)", header).group(1))  # type: ignore[union-attr]
        assert workdir == tmp_path / "edgepipe-demo"
        commands = [line.strip() for line in header.splitlines() if "edgepipe" in line]
        status_cmd = next(c for c in commands if c.startswith("edgepipe status -c"))
        export_cmd = next(c for c in commands if c.startswith("edgepipe export -c"))
        devices_cmd = next(c for c in commands if c.startswith("edgepipe-cloud devices"))
        assert any(c.startswith("edgepipe-cloud serve --db") for c in commands)

        sampler = Sampler(metrics)
        sampler.start()

        # -- the dashboard, signed in as the header says ------------------------------------
        page = browser.new_page(viewport={"width": 1360, "height": 900})  # type: ignore[attr-defined]
        page.set_default_timeout(60_000)
        page.goto(url + "/")
        assert page.url.startswith(url + "/login")
        page.fill("input[name=username]", user)
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        page.wait_for_url(url + "/")
        assert page.inner_text(".operator") == user
        for dev in DEVICES:
            page.wait_for_selector(f"tr[data-device='{dev}'][data-online=true]")
        assert page.locator("tr[data-device]").count() == 3
        screenshot(page, "demo-fleet.png")

        # -- each device: its own chart, and it is live (more readings at the next refresh) ---
        for dev in DEVICES:
            page.click(f"tr[data-device='{dev}'] a")
            page.wait_for_url(f"{url}/devices/{dev}")
            page.wait_for_function("() => +document.querySelector('#chart').dataset.readings > 0")
            seen = int(page.get_attribute("#chart", "data-readings") or 0)
            assert page.locator("#chart canvas").count() >= 1
            page.wait_for_function(
                f"() => +document.querySelector('#chart').dataset.readings > {seen}"
            )
            page.goto(url + "/")
        page.close()

        # -- Ctrl-C: the edges store, flush and upload, then the final status ----------------
        term.ctrl_c()
        term.expect(r"stopped \(edgepipe exit code 0\)", timeout=180)
        assert term.proc.wait(120) == 0, term.text
        sampler.done.wait(60)
    finally:
        term.close()
    out = term.text

    assert len(sampler.samples) > 20, "the metrics were sampled all along the run"
    assert _identity_errors(sampler.samples) == []

    final = _final_numbers(out)
    assert final["received"] == final["published"] * 13, out  # 13 metrics per message
    assert (
        final["received"]
        == final["filtered out"]
        + final["dead-lettered"]
        + final["in flight"]
        + final["stored"]
        - final["created by stages"]
    ), out
    assert final["in flight"] == 0
    assert final["created by stages"] > 0, "the window stage's aggregates flushed at shutdown"
    assert final["synced"] == final["stored"] and final["backlog"] == 0, out
    assert "everything stored is in the cloud: backlog 0" in out
    # the last samples were taken after the stop began; the final counters are >= them
    last = {u: m for u, m in sampler.samples}
    assert sum(m["stored"] for m in last.values()) <= final["stored"]

    # -- the printed commands work on the kept files, and agree with the final status -------
    per_device = {
        d: int(n.replace(",", "")) for d, n in re.findall(r"  (aq-\d\d)  stored ([\d,]+)", out)
    }
    assert sorted(per_device) == DEVICES
    assert sum(per_device.values()) == final["stored"]
    cloud = {
        d["name"]: d for d in map(json.loads, _run_printed(devices_cmd, tmp_path).splitlines())
    }
    assert sorted(cloud) == DEVICES
    for dev in DEVICES:
        st = json.loads(_run_printed(status_cmd.replace("aq-01", dev) + " --json", tmp_path))
        assert st["store"]["readings"] == per_device[dev]
        assert st["store"]["unsynced_readings"] == st["sync"]["backlog_readings"] == 0
        assert cloud[dev]["last_seq"] == st["store"]["last_seq"]
        assert cloud[dev]["reported"]["backlog_readings"] == 0
    exported = _run_printed(export_cmd, tmp_path).splitlines()
    assert exported[0].startswith("device,metric,ts")
    assert len(exported) == 1 + per_device["aq-01"]
    assert {row.split(",")[0] for row in exported[1:]} == {"aq-01"}
