"""The health panel, the device log view and the fleet's badges in headless Chromium
against a real receiver (``edgepipe-cloud serve``):

* fed signed uploads of health snapshots and log records (a device filling its store, one
  logging a message with markup in it): the charts draw the data, the log view filters by
  level and text and shows markup as text, the fleet badge links to its evidence;
* fed a real ``edgepipe run`` whose chain has a stage (an inline WAT module) that traps on
  the readings of one sensor: the trap and its code reach the health panel and the log view.

With ``EDGEPIPE_SCREENSHOTS=1`` the health panel and the log view are saved under
docs/screenshots/.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sync._health import encode_health
from tests.helpers.browser import CHROMIUM, add_operator, screenshot, sign_in
from tests.helpers.cloud_client import health_snapshots, log_record, upload_as
from tests.helpers.edge import make_config, publish, reading_msg, wait_for
from tests.helpers.sync_env import Receiver, edge_sync
from tests.helpers.wasm import wat_module, write_wat

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists()
    or shutil.which("mosquitto") is None
    and not Path("/usr/sbin/mosquitto").exists(),
    reason="needs /usr/bin/chromium and mosquitto (CI installs them with apt)",
)

OPERATOR, PASSWORD = "ops", "correct horse battery"
TOKEN = "health-browser-token"
XSS = '<img src=x onerror="window.__xss = 1">stage <b>scale</b> failed'
XSS_STAGE = '<img src=x onerror="window.__xss = 2">'


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv("EDGEPIPE_CLOUD_REFRESH_S", "0.5")
    monkeypatch.setenv("EDGEPIPE_CLOUD_API_TOKEN", TOKEN)
    with Receiver(tmp_path) as rx:
        add_operator(rx, OPERATOR, PASSWORD)
        yield rx


def _rows(page: Any, sel: str = "#devlog tbody tr") -> list[dict[str, str]]:
    return page.eval_on_selector_all(
        sel,
        "trs => trs.map(tr => ({level: tr.dataset.level || '', n: tr.dataset.n || '',"
        " text: tr.innerText}))",
    )


def _wait_log_query(page: Any, part: str) -> None:
    """Until the log view shows the answer to a query containing ``part``."""
    page.wait_for_function(
        "p => (document.querySelector('#device-log').dataset.query || '').includes(p)", arg=part
    )


def test_health_panel_log_view_and_badges(receiver: Receiver, browser: Any) -> None:
    rx = receiver
    now = int(time.time() * 1000)
    logs = [
        log_record(1, now - 50_000, "WARNING", "stage scale failed (unreachable): wasm trap"),
        log_record(2, now - 40_000, "WARNING", "mqtt connection lost; reconnecting", n=10_000),
        log_record(3, now - 30_000, "ERROR", "ALARM: cannot commit: database or disk is full"),
        log_record(4, now - 20_000, "WARNING", XSS),
    ]
    snaps = health_snapshots(now, fill=0.93)
    for i, (_, snap) in enumerate(snaps):  # a stage name with markup (keys are the device's)
        snap[f"traps:{XSS_STAGE}:oob"] = i // 10
    upload_as(rx, "gw-full", health=encode_health(snaps), logs=logs)
    upload_as(
        rx,
        "gw-calm",
        health=encode_health(health_snapshots(now, fill=0.2)),
        logs=[log_record(1, now - 45_000, "WARNING", "AOT cache entry rejected; recompiling")],
    )

    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.set_default_timeout(20_000)
    sign_in(page, rx.url, OPERATOR, PASSWORD)

    # -- the fleet: the full store's badge, and none for the calm device ---------------------
    badge = page.locator("tr[data-device='gw-full'] a[data-badge=store_full]")
    badge.wait_for()
    assert "93%" in badge.inner_text()
    assert page.locator("tr[data-device='gw-calm'] a[data-badge]").count() == 0
    page.wait_for_selector("[data-stat=attention] .value:text-is('1')")
    screenshot(page, "fleet-badges.png")

    # -- the badge links to its evidence: the snapshot, its key, the store chart -------------
    badge.click()
    page.wait_for_url(f"{rx.url}/devices/gw-full?*")
    page.wait_for_selector("#evidence:not([hidden])[data-found=true]")
    assert page.get_attribute("#evidence", "data-seq") == "30"
    hl = page.locator("#evidence-values tr.hl")
    assert hl.get_attribute("data-key") == "store_used_b"
    assert hl.locator("td").nth(1).inner_text() == str(int((100 << 20) * 0.93))
    page.wait_for_selector("[data-chart=store].hl canvas")

    # -- the health panel draws what was uploaded ----------------------------------------------
    page.click("#reset-zoom")
    page.click("[data-range='1h']")
    page.wait_for_function(
        "() => { const d = document.querySelector('#health').dataset;"
        " return +d.span >= 3600000 && +d.snapshots === 30; }"
    )
    for chart in ("cpu", "rss", "store", "link", "drops", "dead_letters", "traps", "skew"):
        div = page.locator(f"[data-chart={chart}]")
        assert div.locator("canvas").count() >= 1, chart
        assert int(div.get_attribute("data-points") or 0) >= 29, chart
    health = page.evaluate("() => window.edgepipeHealth")
    assert health["chain"]["current"] == "bbbb2222"
    assert page.inner_text("[data-stat=chain] .value") == "bbbb2222"
    assert page.inner_text("[data-stat=skew] .value").startswith("0.4 s")
    assert page.inner_text("[data-stat=store] .value") == "93 %"
    assert page.text_content("[data-stat=store] .label") == "Store (of 100 MB)"
    assert page.inner_text("[data-stat=cpu] .value") == "1.5 %"
    trap = page.locator("#health-traps tr[data-key='traps:scale:unreachable']")
    assert trap.locator("td").nth(1).inner_text() == "unreachable"
    assert trap.locator("td").nth(2).inner_text() == "28"
    assert page.locator("#device-badges a[data-badge=store_full]").count() == 1
    odd = page.locator(f"#health-traps tr[data-key='traps:{XSS_STAGE}:oob']")
    assert odd.locator("td").nth(0).inner_text() == XSS_STAGE  # as text, in the table ...
    assert f"{XSS_STAGE}:oob" in page.inner_text("[data-chart=traps]")  # ... and the legend
    assert page.locator("#health img, #evidence img").count() == 0
    assert page.evaluate("() => window.__xss") is None
    page.set_viewport_size({"width": 1360, "height": 2400})  # the whole panel in view
    page.evaluate("() => window.scrollTo(0, 0)")
    screenshot(page.locator("#health"), "health-panel.png")
    page.set_viewport_size({"width": 1360, "height": 900})

    # -- the device's log view: newest first, counts, level and text filters ------------------
    page.wait_for_function("() => +document.querySelector('#device-log').dataset.rows === 4")
    rows = _rows(page)
    assert [r["level"] for r in rows] == ["WARNING", "ERROR", "WARNING", "WARNING"]
    assert rows[2]["n"] == "10000" and "×10,000" in rows[2]["text"]
    # markup a device logged is text: no element made of it, no script run
    assert XSS in rows[0]["text"]
    assert page.locator("#devlog img, #devlog b").count() == 0
    assert page.evaluate("() => window.__xss") is None
    page.select_option("#devlog-level", "ERROR")
    _wait_log_query(page, "level=ERROR")
    assert [r["level"] for r in _rows(page)] == ["ERROR"]
    page.select_option("#devlog-level", "")
    page.fill("#devlog-q", "MQTT CONNECTION")
    _wait_log_query(page, "q=MQTT")
    assert [r["n"] for r in _rows(page)] == ["10000"]
    page.fill("#devlog-q", "no such words")
    _wait_log_query(page, "q=no")
    assert "No log records match." in page.inner_text("#devlog")

    # -- the fleet's log view: every device, filtered by device and text ----------------------
    page.goto(rx.url + "/logs")
    page.wait_for_function("() => +document.querySelector('#device-log').dataset.rows === 5")
    assert {r["text"].split("\t")[1] for r in _rows(page)} == {"gw-full", "gw-calm"}
    page.fill("#log-device", "gw-calm")
    _wait_log_query(page, "device=gw-calm")
    assert [r["text"].split("\t")[1] for r in _rows(page)] == ["gw-calm"]
    page.fill("#log-device", "")
    page.fill("#devlog-q", "alarm")
    page.wait_for_function(
        "() => { const d = document.querySelector('#device-log').dataset;"
        " return d.query.includes('q=alarm') && !d.query.includes('device='); }"
    )
    (alarm,) = _rows(page)
    assert "ALARM: cannot commit" in alarm["text"] and "gw-full" in alarm["text"]
    page.fill("#devlog-q", "")
    page.wait_for_function(
        "() => { const d = document.querySelector('#device-log').dataset;"
        " return !d.query.includes('q=') && +d.rows === 5; }"
    )
    assert page.evaluate("() => window.__xss") is None
    screenshot(page.locator("#device-log"), "device-logs.png")


def _trapper(tmp_path: Path) -> Path:
    """A stage that traps (``unreachable``) on every batch it is given; matched to the
    readings of one sensor, it traps on those and lets the others pass."""
    return write_wat(tmp_path, "trapper", wat_module("(unreachable)"))


def test_a_trapping_stage_in_health_and_logs(
    tmp_path: Path, broker: Any, keyfile: Path, edge: Any, receiver: Receiver, browser: Any
) -> None:
    rx = receiver
    device = "edge-trap-01"
    secret = rx.add_device(device)
    cfg = make_config(
        tmp_path,
        broker,
        keyfile,
        device={"id": device},
        chain=[
            {
                "name": "trapper",
                "module": str(_trapper(tmp_path)),
                "kind": "filter_map",
                "on_error": "dead_letter",
                "match": {"devices": ["bad-sensor"]},
            }
        ],
        sync=edge_sync(rx.url, secret),
    )
    proc = edge(cfg)
    proc.wait_subscribed()
    for i in range(3):  # three batches, each with readings the stage traps on
        publish(
            broker,
            [reading_msg("good-sensor", "T", 10 * i, 20.0), reading_msg("bad-sensor", "T", i, 1.0)],
        )
        proc.wait_metric("edgepipe_stage_errors_total", i + 1, stage="trapper", code="unreachable")
    # the snapshot with the traps is taken when the edge stops; the restarted edge uploads it
    assert proc.terminate() == 0
    proc2 = edge(cfg)
    proc2.wait_subscribed()
    publish(broker, [reading_msg("good-sensor", "T", 100, 21.0)])

    api = httpx.Client(base_url=rx.url, headers={"Authorization": f"Bearer {TOKEN}"})

    def trapped() -> list[dict[str, Any]]:
        snaps = api.get(f"/v1/devices/{device}/health").json()["snapshots"]
        return [s for s in snaps if s["values"].get("traps:trapper:unreachable")]

    try:
        snaps = wait_for(trapped, 60, "a snapshot with the traps at the receiver")
        assert snaps[0]["values"]["traps:trapper:unreachable"] == 3  # type: ignore[index]
        assert snaps[0]["values"]["dead_letters:trapper:unreachable"] == 3  # type: ignore[index]

        def logged() -> list[dict[str, Any]]:
            r = api.get(f"/v1/devices/{device}/logs", params={"q": "unreachable"})
            return r.json()["logs"]

        logs: Any = wait_for(logged, 30, "the trap's warning at the receiver")
        rec = logs[0]
        assert rec["level"] == "WARNING" and rec["n"] == 3
        assert rec["msg"].startswith("stage trapper failed (unreachable)")
    finally:
        api.close()

    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.set_default_timeout(20_000)
    sign_in(page, rx.url, OPERATOR, PASSWORD)
    page.goto(f"{rx.url}/devices/{device}")
    row = page.locator("#health-traps tr[data-key='traps:trapper:unreachable']")
    row.wait_for()
    assert row.locator("td").nth(0).inner_text() == "trapper"
    assert row.locator("td").nth(1).inner_text() == "unreachable"
    assert row.locator("td").nth(2).inner_text() == "3"
    assert int(page.get_attribute("[data-chart=traps]", "data-points") or 0) >= 1
    dl = page.locator("#health-dead_letters tr[data-key='dead_letters:trapper:unreachable']")
    assert dl.locator("td").nth(1).inner_text() == "unreachable"
    assert dl.locator("td").nth(2).inner_text() == "3"
    page.fill("#devlog-q", "unreachable")
    _wait_log_query(page, "q=unreachable")
    page.wait_for_function("() => +document.querySelector('#device-log').dataset.rows === 1")
    (r,) = _rows(page)
    assert "stage trapper failed (unreachable)" in r["text"] and r["n"] == "3"
    assert proc2.terminate() == 0
