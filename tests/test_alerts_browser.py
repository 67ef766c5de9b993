"""The fleet page's Alerts section in headless Chromium, against a real receiver app (uvicorn
on loopback, a real SQLite file): a firing alert shows with its device, rule and summary,
all of it as text -- a device name that is markup stays text -- and its resolve shows."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cloud import Settings, create_app
from cloud._auth import hash_password
from core._clock import ManualClock
from tests.helpers.browser import headless_chromium
from tests.helpers.cloud_client import TOKEN, LiveServer, open_test_backend
from tests.helpers.edge import wait_for

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium (CI installs it with apt)"
)
OPERATOR, PASSWORD = "ops", "correct horse battery"


@pytest.fixture
def browser() -> Iterator[object]:
    with headless_chromium(CHROMIUM) as b:
        yield b


def test_fleet_page_shows_alerts_as_text(
    tmp_path: Path, browser: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEPIPE_CLOUD_REFRESH_S", "0.3")
    hostile = f'<img src=x onerror="window.pwned=1">-{uuid.uuid4().hex[:6]}'
    rules = tmp_path / "alerts.yaml"
    rules.write_text(
        yaml.safe_dump(
            {
                "evaluate_every_s": 3600,
                "rules": [
                    {"name": "quiet", "kind": "silent", "for_min": 1, "severity": "critical"}
                ],
            }
        )
    )
    clock = ManualClock(time.time())
    with open_test_backend("sqlite", tmp_path) as backend:
        backend.add_operator(OPERATOR, hash_password(PASSWORD))
        backend.add_device(hostile, b"\x01" * 32)
        app = create_app(Settings(api_token=TOKEN, alerts_file=str(rules)), backend=backend,
                         clock=clock)  # fmt: skip
        with LiveServer(app) as server:
            engine = app.state.alerts
            wait_for(lambda: engine.evaluations >= 1)  # the evaluation at start is done
            clock.advance(120)
            (fired,) = engine.evaluate({hostile})
            page = browser.new_page(viewport={"width": 1360, "height": 900})  # type: ignore[attr-defined]
            page.goto(server.url + "/")
            page.fill("input[name=username]", OPERATOR)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            cell = page.wait_for_selector("#alerts tbody tr td:has-text('never uploaded')")
            row = cell.evaluate_handle("td => td.closest('tr')")
            texts = row.evaluate("tr => [...tr.cells].map((c) => c.textContent)")
            assert texts[:5] == ["firing", "critical", hostile, "quiet", fired.summary]
            assert texts[7] == "yes"  # no webhooks: delivered to all (none) at once
            assert page.evaluate("() => window.pwned") is None
            assert page.query_selector("#alerts img") is None
            link = row.evaluate("tr => tr.cells[2].querySelector('a').getAttribute('href')")
            assert link.startswith("/devices/%3Cimg")
            note = page.text_content("#alerts-note")
            assert note is not None and note.startswith("1 firing · 1 rules")

            backend.remove_device(hostile)
            engine.evaluate()  # the device is gone: its alert resolves
            page.wait_for_selector("#alerts tbody tr td .tag.resolved")
            assert page.text_content("#alerts-note").startswith("0 firing")  # type: ignore[union-attr]
            assert page.evaluate("() => window.pwned") is None
