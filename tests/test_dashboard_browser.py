"""The dashboard in a real browser (headless Chromium driven by Playwright) against a real
receiver (``edgepipe-cloud serve`` subprocess on loopback) fed by a real edge pipeline
(``edgepipe run`` with sync enabled, readings published through a private mosquitto).

Sign-in (a failed one first), the device appearing on the fleet page, its chart and its
points, the device going offline when the edge process stops (readings published meanwhile
queue in the broker: the chart shows the gap), and coming back: the backlog arrives and the
gap fills.  With ``EDGEPIPE_SCREENSHOTS=1`` the main pages are saved under docs/screenshots/.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.browser import CHROMIUM, screenshot
from tests.helpers.cloud_client import DeviceClient, make_batch
from tests.helpers.edge import make_config, publish, reading_msg, wait_for
from tests.helpers.sync_env import Receiver, edge_sync

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists()
    or shutil.which("mosquitto") is None
    and not Path("/usr/sbin/mosquitto").exists(),
    reason="needs /usr/bin/chromium and mosquitto (CI installs them with apt)",
)

DEVICE = "edge-lab-01"
OPERATOR, PASSWORD = "ops", "correct horse battery"
OFFLINE_S = 3
CLI = [sys.executable, "-c", "import sys; from cloud.cli import main; sys.exit(main())"]


def _cli(rx: Receiver, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    group, *rest = args
    return subprocess.run(
        [*CLI, group, "--db", rx.db, "--master-key-file", str(rx.master_key_file), *rest],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """``edgepipe-cloud serve`` with a short offline threshold and a fast page refresh."""
    monkeypatch.setenv("EDGEPIPE_CLOUD_OFFLINE_AFTER_S", str(OFFLINE_S))
    monkeypatch.setenv("EDGEPIPE_CLOUD_REFRESH_S", "0.4")
    with Receiver(tmp_path) as rx:
        yield rx


def _fake_sysfs(root: Path, iface: str) -> Path:
    """A sysfs tree where ``iface`` is up: the edge reports that link kind."""
    d = root / "class" / "net" / iface
    d.mkdir(parents=True)
    (d / "operstate").write_text("up\n")
    (d / "carrier").write_text("1\n")
    return root


def _chart(page: object) -> dict:
    return page.evaluate("() => window.edgepipeChart")  # type: ignore[attr-defined]


def _bucket_counts(chart: dict, ts_ms: list[int]) -> list[int]:
    return [chart["count"][(t - chart["since"]) // chart["step"]] for t in ts_ms]


def _publish_at(broker: object, metric: str, seq0: int, stamps: list[float]) -> None:
    publish(
        broker,  # type: ignore[arg-type]
        [
            reading_msg(DEVICE, metric, seq0 + i, round(21 + 1.5 * math.sin(t / 50), 3), ts=t)
            for i, t in enumerate(stamps)
        ],
    )


def _other_devices(rx: Receiver) -> None:
    """A second device (a scripted client of the wire protocol) with a backlog, a cellular
    link and dead letters, and a refused upload: the fleet and log pages have content.

    The refused upload is an authenticated one (its batch number reused with other
    readings: 409 ``sequence_conflict``): only refusals of requests that proved they come
    from the device are written to the rejection log (docs/sync-protocol.md)."""
    secret = bytes.fromhex(rx.add_device("edge-yard-07"))
    rx.add_device("edge-dock-02")  # registered, never connected
    now = int(time.time() * 1000)
    dev = DeviceClient(rx.url, "edge-yard-07", secret)
    try:
        readings = [
            ("pump-3", "pressure", None, now - 600_000 + i * 5000, 2.0 + i % 9 * 0.1, 0)
            for i in range(120)
        ]
        status = {
            "backlog_batches": 4,
            "backlog_readings": 1840,
            "oldest_unsynced_ms": now - 540_000,
            "dead_letters": 2,
            "link": "cellular",
        }
        dl = [
            {
                "seq": 1,
                "ts": now - 90_000,
                "topic": "sensors/pump-3/pressure",
                "stage": "decode",
                "reason": "payload is not JSON: b'\\xff\\xfe'",
                "size": 2,
            },
            {
                "seq": 2,
                "ts": now - 30_000,
                "topic": "sensors/pump-3/flow",
                "stage": "validity",
                "reason": "value -200 is the sensor's error sentinel",
                "size": 48,
            },
        ]
        assert (
            dev.upload(
                [make_batch(1, readings)], status=status, dead_letters=dl, link="cellular"
            ).status_code
            == 200
        )
        conflict = dev.upload([make_batch(1, readings[:1])])
        assert conflict.status_code == 409, conflict.text
        assert conflict.json()["error"] == "sequence_conflict"
    finally:
        dev.close()


def test_dashboard_follows_a_real_edge_through_an_outage(
    tmp_path: Path, broker: object, keyfile: Path, edge: object, receiver: Receiver, browser: object
) -> None:
    rx = receiver
    secret = rx.add_device(DEVICE)
    r = _cli(rx, "users", "add", OPERATOR, "--password-stdin", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    cfg = make_config(
        tmp_path,
        broker,  # type: ignore[arg-type]
        keyfile,
        device={"id": DEVICE},
        sync=edge_sync(
            rx.url, secret, links={"sysfs_root": str(_fake_sysfs(tmp_path / "sys", "wlan0"))}
        ),
    )
    proc = edge(cfg)  # type: ignore[operator]
    proc.wait_subscribed()
    _other_devices(rx)

    page = browser.new_page(viewport={"width": 1360, "height": 900})  # type: ignore[attr-defined]
    page.set_default_timeout(20_000)

    # -- sign in: a wrong password first ----------------------------------------------------
    page.goto(rx.url + "/")
    assert page.url.startswith(rx.url + "/login")
    screenshot(page, "login.png")
    page.fill("input[name=username]", OPERATOR)
    page.fill("input[name=password]", "not the password")
    with page.expect_response(lambda resp: resp.url.startswith(rx.url + "/login")) as resp:
        page.click("button[type=submit]")
    assert resp.value.status == 401
    assert "Wrong user name or password" in page.inner_text(".alert")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(rx.url + "/")
    assert page.inner_text(".operator") == OPERATOR

    # -- readings flow; the device appears online ----------------------------------------------
    # Twelve minutes of history, one reading per 24 s, with a two-minute hole (sensor silent).
    now = time.time()
    first = [now - 720 + i * 24 for i in range(30) if not 12 <= i < 17]
    n1 = len(first)
    _publish_at(broker, "temperature", 0, first)
    row = f"tr[data-device='{DEVICE}']"
    page.wait_for_selector(f"{row}[data-online=true]")
    wait_for(lambda: page.inner_text(f"{row} td:nth-child(7)") == str(n1), 20, "readings today")
    assert "wifi" in page.inner_text(row)
    assert page.locator("tr[data-device='edge-dock-02'][data-online=false]").count() == 1
    screenshot(page, "fleet.png")

    # -- its chart: every reading is a point ----------------------------------------------------
    page.click(f"{row} a")
    page.wait_for_url(f"{rx.url}/devices/{DEVICE}")
    page.wait_for_function(f"() => document.querySelector('#chart').dataset.readings === '{n1}'")
    chart = _chart(page)
    assert chart["step"] == 1000 and chart["metric"] == "temperature"
    assert page.get_attribute("#chart", "data-points") == str(n1)
    assert _bucket_counts(chart, [int(t * 1000) for t in first]) == [1] * n1
    assert page.get_attribute("#chart", "data-gaps") == "1"  # the silent two minutes
    assert page.locator("#chart canvas").count() >= 1
    assert page.inner_text("#device-status") == "online"

    # -- the edge stops: offline; what sensors publish now waits in the broker ------------------
    assert proc.terminate() == 0
    # the sensor goes on publishing: five readings of the last seconds, each in its own
    # one-second bucket of the chart, wait in the broker while no edge is subscribed
    stopped = time.time()
    during = [stopped - 6 + i for i in range(5)]
    assert during[0] > first[-1] + 1
    _publish_at(broker, "temperature", 100, during)
    # the receiver marks the device offline OFFLINE_S after its last contact
    page.wait_for_function(
        "() => document.querySelector('#device-status').textContent === 'offline'",
        timeout=60_000,
    )
    updated = int(page.get_attribute("#chart", "data-updated") or 0)
    page.wait_for_function(f"() => +document.querySelector('#chart').dataset.updated > {updated}")
    chart = _chart(page)
    gap = _bucket_counts(chart, [int(t * 1000) for t in during])
    assert gap == [0] * len(during), "readings published while offline must not be charted yet"
    assert all(
        chart["avg"][(int(t * 1000) - chart["since"]) // chart["step"]] is None for t in during
    )
    assert int(page.get_attribute("#chart", "data-nulls") or 0) > 0
    screenshot(page, "device-offline.png")

    # -- back: the queued backlog arrives and fills the gap; new readings follow ----------------
    proc2 = edge(cfg)  # type: ignore[operator]
    proc2.wait_subscribed()
    after = [time.time() - 0.5 + i * 0.05 for i in range(10)]
    _publish_at(broker, "temperature", 500, after)
    total = n1 + len(during) + len(after)
    page.wait_for_function(
        f"() => document.querySelector('#chart').dataset.readings === '{total}'", timeout=30_000
    )
    page.wait_for_function(
        "() => document.querySelector('#device-status').textContent === 'online'"
    )
    chart = _chart(page)
    assert all(c >= 1 for c in _bucket_counts(chart, [int(t * 1000) for t in during])), "gap filled"
    # zoom: drag across the middle of the chart, finer or equal buckets over a shorter window
    box = page.locator("#chart .u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.99, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    page.wait_for_selector("#reset-zoom:not([hidden])")
    page.wait_for_function(
        f"() => +document.querySelector('#chart').dataset.until - +document.querySelector('#chart').dataset.since < {15 * 60_000 // 3}"
    )
    page.click("#reset-zoom")
    page.wait_for_function(
        f"() => +document.querySelector('#chart').dataset.until - +document.querySelector('#chart').dataset.since >= {15 * 60_000}"
    )
    screenshot(page, "device.png")

    # -- logs: the refused upload and the reported dead letters --------------------------------
    page.click("nav a[href='/logs']")
    page.wait_for_selector("#rej tbody tr td:has-text('sequence_conflict')")
    page.wait_for_selector("#dl tbody tr td:has-text('sentinel')")
    screenshot(page, "logs.png")

    # phone-sized fleet view (responsive layout)
    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)  # type: ignore[attr-defined]
    phone.context.add_cookies(page.context.cookies())
    phone.goto(rx.url + "/")
    phone.wait_for_selector(f"{row}")
    assert phone.evaluate("() => document.documentElement.scrollWidth") <= 390 + 1
    screenshot(phone, "fleet-phone.png")

    # -- sign out ends the session -------------------------------------------------------------
    page.click("button:has-text('Log out')")
    page.wait_for_url(rx.url + "/login")
    page.goto(rx.url + "/logs")
    assert page.url.startswith(rx.url + "/login")
