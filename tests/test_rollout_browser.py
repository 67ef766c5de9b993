"""The rollout pages in headless Chromium against a real receiver (``edgepipe-cloud serve``):
the list, a rollout's waves and devices per state with reasons (escaped), live updates,
and the pause button (CSRF-protected; an operator session only).  Device check-ins are
stored in the receiver's database as its check-in endpoint stores them; rollouts with real
edge processes are in tests/test_rollout_fleet.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core._clock import now_ms
from tests.helpers.browser import headless_chromium
from tests.helpers.edge import wait_for
from tests.helpers.fleet import Fleet, validity, write_filters

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium (CI installs it with apt)"
)
OPERATOR, PASSWORD = "ops", "correct horse battery"
HOSTILE = '<img src=x onerror="window.pwned=1">'


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    monkeypatch.setenv("EDGEPIPE_CLOUD_ROLLOUT_EVALUATE_S", "0.3")
    monkeypatch.setenv("EDGEPIPE_CLOUD_REFRESH_S", "0.3")
    f = Fleet(tmp_path / "cloud")
    for name in ["a-1", "a-2", "b-1", "b-2", "b-3", "c-1"]:
        f.add_device(name)
        r = f.cli("devices", "label", name, f"group={name[0]}")
        assert r.returncode == 0, r.stderr
    from cloud._auth import hash_password

    with f.backend() as b:
        b.add_operator(OPERATOR, hash_password(PASSWORD))
    with f.receiver:
        yield f


def _report(fleet: Fleet, device: str, **kw: Any) -> None:
    rep = dict.fromkeys(
        ("active_version", "previous_version", "applied_ms", "status", "version", "reason",
         "detail", "health"),
    )  # fmt: skip
    rep.update(kw)
    with fleet.backend() as b:
        b.report_bundle_state(device, rep, now=now_ms())


def _local_bundle(fleet: Fleet) -> int:
    r = fleet.cli("bundle", "create", "--local")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["version"])


def test_the_rollout_page_shows_waves_and_states_live_and_pause_works(
    tmp_path: Path, fleet: Fleet
) -> None:
    base = fleet.bundle(write_filters(tmp_path / "base", [validity(0, 10)], tag="base"))
    for name in ("a-1", "a-2", "b-1", "b-2", "b-3"):
        fleet.desire(name, base)
        _report(fleet, name, active_version=base, status="applied", version=base)
    # c-1 went back to its configured chain with a local bundle
    local = _local_bundle(fleet)
    fleet.desire("c-1", local)
    _report(fleet, "c-1", active_version=local, status="applied", version=local, chain="local")
    v = fleet.bundle(write_filters(tmp_path / "v", [validity(0, 20)], tag="v"))
    # rollout 1 (group a): its canary refuses the bundle with a reason full of markup
    r = fleet.cli("rollout", "start", str(v), "--group", "group=a")
    assert r.returncode == 0, r.stderr
    _report(fleet, "a-1", active_version=base, status="failed", version=v,
            reason="invalid_chain", detail=HOSTILE)  # fmt: skip
    # rollout 2 (group b): the canary applies it and soaks (30 minutes)
    r = fleet.cli("rollout", "start", str(v), "--group", "group=b", "--wave", "1")
    assert r.returncode == 0, r.stderr
    with fleet.backend() as b:
        wait_for(lambda: b.rollout(1)["state"] == "rolled_back", 30, "rollout 1 halted")

    with headless_chromium(CHROMIUM) as browser:
        page = browser.new_page()  # type: ignore[attr-defined]
        url = fleet.receiver.url
        page.goto(url + "/rollouts")
        assert page.url.startswith(url + "/login")
        page.fill("input[name=username]", OPERATOR)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(url + "/rollouts")
        page.wait_for_selector("#rollouts tr[data-rollout='2']")
        rows = page.inner_text("#rollouts tbody")
        assert "group=a" in rows and "group=b" in rows and "rolled back" in rows
        # the fleet table: each device's bundle, and whether it is the desired one
        page.goto(url + "/")
        page.wait_for_selector("#fleet tr[data-device='b-1'] .bundle .tag")
        assert page.inner_text("#fleet tr[data-device='a-2'] .bundle") == f"v{base}"
        cell = page.locator("#fleet tr[data-device='b-1'] .bundle .tag")
        assert cell.get_attribute("data-in-sync") == "false"
        assert cell.inner_text() == f"v{base} → v{v}"
        local_cell = "#fleet tr[data-device='c-1'] .bundle"
        assert page.inner_text(local_cell) == f"local chain (v{local})"

        # rollout 1: the hostile reason is shown as text, never run
        page.goto(url + "/rollouts/1")
        page.wait_for_selector("#rollout-waves tr[data-device='a-1']")
        assert page.get_attribute("#rollout-state", "data-state") == "rolled_back"
        row = page.inner_text("#rollout-waves tr[data-device='a-1']")
        assert "failed" in row and HOSTILE in row
        assert page.evaluate("window.pwned") is None
        assert page.locator("#rollout-waves img").count() == 0
        assert page.is_hidden("button[data-action=pause]")  # nothing to pause

        # rollout 2: live; the canary's state follows its reports
        page.goto(url + "/rollouts/2")
        page.wait_for_selector("#rollout-waves tr[data-device='b-1'][data-state='downloading']")
        assert page.inner_text("#rollout-waves section[data-wave='0'] h3") == "canary (current)"
        waves = page.locator("#rollout-waves section").count()
        assert waves == 3
        assert page.get_attribute("#rollout-waves tr[data-device='b-3']", "data-state") == "pending"
        _report(fleet, "b-1", active_version=v, previous_version=base, status="applied", version=v)
        page.wait_for_selector("#rollout-waves tr[data-device='b-1'][data-state='applied']")
        # pause, from the page
        page.once("dialog", lambda d: d.accept())
        page.click("button[data-action=pause]")
        page.wait_for_selector("#rollout-state[data-state='paused']")
        assert page.is_visible("button[data-action=resume]")
        assert page.is_hidden("button[data-action=pause]")
        page.wait_for_selector("#rollout-events td:has-text('by ops')")
        cookies = {c["name"]: c["value"] for c in page.context.cookies()}

    with fleet.backend() as b:
        assert b.rollout(2)["state"] == "paused"
    # the same action without the session's CSRF token, or from another site, is refused
    with httpx.Client(base_url=url, cookies=cookies) as c:
        r = c.post("/v1/rollouts/2/resume")
        assert r.status_code == 403 and r.json()["error"] == "csrf"
        r = c.post(
            "/v1/rollouts/2/resume",
            headers={"X-Edgepipe-CSRF": "wrong", "Origin": url},
        )
        assert r.status_code == 403
        r = c.post("/v1/rollouts/2/resume", headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
    r = httpx.post(url + "/v1/rollouts/2/resume")
    assert r.status_code == 401
    with fleet.backend() as b:
        assert b.rollout(2)["state"] == "paused"
    r = fleet.cli("rollout", "status", "2")
    assert "-- paused" in r.stdout and "pause" in r.stdout
    assert json.loads(fleet.cli("rollout", "status", "2", "--json").stdout)["state"] == "paused"
