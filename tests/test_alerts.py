"""Alerts on the receiver (docs/alerts.md), on both backends (a real SQLite file, a schema of
the real PostgreSQL), through a real uvicorn server, with a real HTTP webhook on loopback
(tests/helpers/webhook.py) recording what it is sent: firing, de-duplication, resolve,
retries after a 500, the bounded queue while the webhook is down, state across a restart,
the rules file's located errors."""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cloud import Backend, Settings, create_app
from cloud._alert_rules import load_alert_rules
from cloud._local import cli_command
from cloud._webhook import render
from core._clock import ManualClock
from core._errors import ConfigError
from sync._health import encode_health
from tests.helpers.cloud_client import (
    TOKEN,
    DeviceClient,
    LiveServer,
    encode,
    make_batch,
    new_device,
    series_readings,
)
from tests.helpers.edge import free_port, wait_for
from tests.helpers.webhook import WebhookRecorder

HOOK_KEY = "webhook-signing-key-for-tests"


def _now_ms() -> int:
    return int(time.time() * 1000)


class Device(DeviceClient):
    """A device client that also uploads health snapshots."""

    seq = 0

    last_ts = 0

    def health(self, **values: Any) -> httpx.Response:
        self.seq += 1
        self.last_ts = max(_now_ms(), self.last_ts + 1)  # each snapshot newer than the last
        block = encode_health([(self.seq, {"ts": self.last_ts, **values})])
        r = self.post_raw(encode(self.body([], health=block), self.encoding))
        assert r.status_code == 200, r.text
        return r


@contextmanager
def receiver(
    backend: Backend, tmp: Path, rules: dict[str, Any], clock: ManualClock, **kw: Any
) -> Iterator[tuple[LiveServer, Any]]:
    """The receiver app with ``rules`` written to a rules file, evaluated by ``clock``."""
    (tmp / "hook.key").write_text(HOOK_KEY + "\n")
    path = tmp / "alerts.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    settings = Settings(api_token=TOKEN, alerts_file=str(path), **kw)
    app = create_app(settings, backend=backend, clock=clock)
    with LiveServer(app) as s:
        yield s, app.state.alerts


def _device(backend: Backend, server: LiveServer) -> Device:
    name, secret = new_device(backend, "al")
    return Device(server.url, name, secret)


def _hook(url: str, **kw: Any) -> dict[str, Any]:
    return {"url": url, "secret_file": "hook.key", "retry_min_s": 0.05, "retry_max_s": 0.2} | kw


def _operator(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"})


def _rows(server: LiveServer, **params: Any) -> list[dict[str, Any]]:
    with _operator(server) as op:
        r = op.get("/v1/alerts", params=params)
        assert r.status_code == 200, r.text
        return r.json()["alerts"]


# -- firing, de-duplication, resolve -------------------------------------------------------
def test_store_full_fires_once_then_resolves(backend: Backend, tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    with WebhookRecorder() as hook:
        # the device's name is only known once it is registered: a placeholder glob first
        name, secret = new_device(backend, "full")
        rules = {
            "evaluate_every_s": 3600,
            "dashboard_url": "https://cloud.example",
            "rules": [
                {"name": "store", "kind": "store_full", "above": 0.8, "devices": [name],
                 "severity": "critical"},
            ],
            "webhooks": [_hook(hook.url)],
        }  # fmt: skip
        with receiver(backend, tmp_path, rules, clock) as (server, engine):
            dev = Device(server.url, name, secret)
            quota = 1_000_000
            dev.health(store_used_b=500_000, store_quota_b=quota)
            dev.health(store_used_b=900_000, store_quota_b=quota)  # the upload evaluates it
            (fired,) = hook.wait(1)
            assert fired["status"] == "firing" and fired["version"] == "4"
            (a,) = fired["alerts"]
            assert a["labels"] == {
                "alertname": "store",
                "kind": "store_full",
                "device": name,
                "severity": "critical",
            }
            assert a["annotations"]["summary"] == f"{name}: store 90% of its quota (above 80%)"
            assert a["endsAt"] == "0001-01-01T00:00:00Z"
            assert a["generatorURL"] == f"https://cloud.example/devices/{name}"
            assert fired["groupKey"] == f"store:{name}"
            post = hook.posts[0]
            t, v1 = (
                p.split("=", 1)[1] for p in post["headers"]["x-edgepipe-alert-signature"].split(",")
            )
            want = hmac.new(HOOK_KEY.encode(), f"{t}.".encode() + post["raw"], hashlib.sha256)
            assert v1 == want.hexdigest()

            # still full: no second firing, however often it is evaluated
            dev.health(store_used_b=950_000, store_quota_b=quota)
            for _ in range(3):
                assert engine.evaluate({name}) == []
            wait_for(lambda: _rows(server, state="firing")[0]["notified"] == "firing")
            (row,) = _rows(server, state="firing", device=name)
            assert row["summary"].endswith("store 95% of its quota (above 80%)")

            dev.health(store_used_b=100_000, store_quota_b=quota)
            got = hook.wait(2)
            assert [b["status"] for b in got] == ["firing", "resolved"]
            assert got[1]["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
            assert len(hook.posts) == 2
            (row,) = _rows(server, device=name)
            assert row["state"] == "resolved" and row["resolved_ms"] is not None
            wait_for(lambda: _rows(server, device=name)[0]["notified"] == "resolved")


def test_webhook_answering_500_is_retried(backend: Backend, tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    with WebhookRecorder() as hook:
        hook.answer(500, 503)
        name, secret = new_device(backend, "retry")
        rules = {
            "evaluate_every_s": 3600,
            "rules": [{"name": "breaker", "kind": "breaker_open", "devices": [name]}],
            "webhooks": [_hook(hook.url)],
        }
        with receiver(backend, tmp_path, rules, clock) as (server, engine):
            dev = Device(server.url, name, secret)
            dev.health(**{"breaker_open:scale": 1})
            (body,) = hook.wait(1)
            assert [p["status"] for p in hook.posts] == [500, 503, 200]
            assert len({p["raw"] for p in hook.posts}) == 1  # the same notification
            assert body["alerts"][0]["labels"]["stage"] == "scale"
            # the webhook records the POST before its answer reaches the sender
            wait_for(lambda: engine.snapshot()["webhooks"][0]["sent"] == 1)
            stats = engine.snapshot()["webhooks"][0]
            assert stats["failures"] == 2 and stats["sent"] == 1 and stats["dropped"] == 0
            assert "503" in stats["last_error"]


def test_dead_webhook_queue_is_bounded_and_delivered_after_restart(
    backend: Backend, tmp_path: Path
) -> None:
    """While the webhook is down, notifications beyond the queue's bound are dropped (and
    counted), uploads are answered as usual; the alert state is in the database, so the
    next start delivers every firing that was not delivered, and fires none twice."""
    clock = ManualClock(time.time())
    name, secret = new_device(backend, "dead")
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    rules: dict[str, Any] = {
        "evaluate_every_s": 3600,
        "rules": [{"name": "breaker", "kind": "breaker_open", "devices": [name]}],
        "webhooks": [_hook(dead, queue=3, retry_min_s=60, retry_max_s=60)],
    }
    stages = {f"breaker_open:s{i}": 1 for i in range(10)}
    with receiver(backend, tmp_path, rules, clock) as (server, engine):
        dev = Device(server.url, name, secret)
        dev.health(**stages)
        wait_for(lambda: len(_rows(server, state="firing", device=name)) == 10)
        # (a full evaluation at start may have resolved another test's alert: offered too)
        s = wait_for(lambda: (w := engine.snapshot()["webhooks"][0])["dropped"] >= 6 and w)
        assert s["queued"] <= 3 + 1  # the queue's bound and the one being retried
        assert s["failures"] >= 1 and s["sent"] == 0
        assert engine.waiting() == s["queued"]  # what was dropped is not held in memory
        t0 = time.monotonic()
        dev.health(**stages)  # uploads are not held up by the dead webhook
        assert time.monotonic() - t0 < 10
        assert all(r["notified"] is None for r in _rows(server, device=name))

    def mine(bodies: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(b["status"], b["groupKey"]) for b in bodies if b["groupLabels"]["device"] == name]

    keys = [f"breaker:{name}:s{i}" for i in range(10)]
    with WebhookRecorder() as hook:
        rules["webhooks"] = [_hook(hook.url)]
        with receiver(backend, tmp_path, rules, clock) as (server, engine):
            wait_for(lambda: len(mine(hook.delivered())) == 10)
            assert sorted(mine(hook.delivered())) == [("firing", k) for k in sorted(keys)]
            dev = Device(server.url, name, secret)
            dev.seq = 100  # after the snapshots stored before the restart
            dev.health(**{"breaker_open:s0": 1})
            wait_for(lambda: len(mine(hook.delivered())) == 19)
            resolved = sorted(k for st, k in mine(hook.delivered()) if st == "resolved")
            assert resolved == sorted(keys[1:])
            assert engine.evaluate({name}) == []
            assert len(mine(hook.delivered())) == 19  # s0 fired once, across the restart


# -- the rules ------------------------------------------------------------------------------
def test_health_rules(backend: Backend, tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    name, secret = new_device(backend, "rules")
    rules = {
        "evaluate_every_s": 3600,
        "rules": [
            {"name": "session", "kind": "session_lost", "within_min": 60, "devices": [name]},
            {"name": "skew", "kind": "clock_skew", "above_s": 300, "devices": [name]},
            {"name": "other", "kind": "breaker_open", "devices": ["not-this-one"]},
        ],
    }
    with receiver(backend, tmp_path, rules, clock) as (server, engine):
        dev = Device(server.url, name, secret)
        dev.health(sessions_lost=0, clock_skew_ms=1000, **{"breaker_open:x": 1})
        assert engine.evaluate({name}) == []
        dev.health(sessions_lost=2, clock_skew_ms=-400_000, **{"breaker_open:x": 1})
        engine.evaluate({name})  # (or the upload's own evaluation got there first)
        firing = {r["rule"]: r for r in _rows(server, state="firing", device=name)}
        assert set(firing) == {"session", "skew"}
        assert firing["session"]["summary"].endswith(
            "MQTT session lost 2 time(s) in the last 60 min"
        )
        assert firing["skew"]["value"] == -400
        dev.health(sessions_lost=2, clock_skew_ms=0)
        clock.advance(3601)  # the session loss is older than the window now
        engine.evaluate({name})
        assert _rows(server, state="firing", device=name) == []


def test_silent_and_no_readings_by_the_injected_clock(backend: Backend, tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    name, secret = new_device(backend, "quiet")
    rules = {
        "evaluate_every_s": 3600,
        "rules": [
            {"name": "silent", "kind": "silent", "for_min": 10, "devices": [name]},
            {"name": "no-pm", "kind": "no_readings", "metric": "pm25", "for_min": 15,
             "devices": [name]},
        ],
    }  # fmt: skip
    with receiver(backend, tmp_path, rules, clock) as (server, engine):
        dev = Device(server.url, name, secret)
        now = _now_ms()
        r = dev.upload([make_batch(1, series_readings(3, start=now - 2000, metric="pm25"))])
        assert r.status_code == 200

        # (the upload's own evaluation runs too, by the same clock: read the state after)
        def firing() -> dict[str, dict[str, Any]]:
            return {r["rule"]: r for r in _rows(server, state="firing", device=name)}

        engine.evaluate({name})
        assert firing() == {}
        clock.advance(11 * 60)
        engine.evaluate({name})
        assert list(firing()) == ["silent"]
        clock.advance(5 * 60)
        engine.evaluate({name})
        a = firing()["no-pm"]
        assert a["summary"] == f"{name}: no pm25 reading for 16 min"
        assert a["labels"]["metric"] == "pm25" and 15.9 <= a["value"] <= 16.0
        later = int(clock.time() * 1000)
        r = dev.upload([make_batch(2, series_readings(1, start=later, metric="pm25"))])
        assert r.status_code == 200
        wait_for(lambda: list(firing()) == ["silent"])
        # the device uploads again: silent resolves once the receiver's clock is past it
        engine.clock = ManualClock(time.time())
        engine.evaluate({name})
        assert firing() == {}
        (row,) = [r for r in _rows(server, device=name) if r["rule"] == "silent"]
        assert row["state"] == "resolved"


def test_alerts_api_needs_an_operator_and_says_when_there_are_no_rules(
    server: LiveServer, operator: httpx.Client
) -> None:
    assert httpx.get(server.url + "/v1/alerts").status_code == 401
    r = operator.get("/v1/alerts")
    assert r.status_code == 200 and r.json()["engine"] is None
    assert operator.get("/v1/alerts", params={"state": "maybe"}).status_code == 400
    assert operator.get("/v1/alerts", params={"limit": "0"}).status_code == 400


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("rules:\n  - name: a\n    kind: store_ful\n", ":2:", "store_ful"),
        ("rules:\n  - name: a\n    kind: no_readings\n    for_min: 5\n", ":2:", "metric"),
        ("rules:\n  - name: a\n    kind: silent\n    for_mins: 5\n", ":4:5:", "unknown key 'for_mins'"),
        ("rules:\n  - {name: a, kind: silent}\n  - {name: a, kind: silent}\n", ":1:", "two rules"),
        ("webhooks:\n  - url: ftp://x.example/\n", ":2:", "http:// or https://"),
        ("webhooks:\n  - url: https://x.example/\n    secret_env: EP_TEST_UNSET_KEY\n", ":3:",
         "$EP_TEST_UNSET_KEY is not set"),
        ("webhooks:\n  - url: https://x.example/\n    format: pagerduty\n", ":2:", "routing_key_env"),
        ("- 1\n", ":1:1:", "must be a mapping"),
        # loaded, then every notification, the webhook's log lines and GET /v1/alerts
        # (its counters show the URL) raised ValueError "Port out of range"
        ("webhooks:\n  - url: http://x.example:99999/\n", ":2:", "port"),
        ("webhooks:\n  - url: \"http://x.example/a\\r\\nX-Injected: 1\"\n", ":2:", "control"),
        ("webhooks:\n  - url: http://x example/\n", ":2:", "spaces"),
        ("webhooks:\n  - url: http:///path\n", ":2:", "host"),
        # a 5000-digit number: ValueError and a traceback (int's digit limit), not located
        ("evaluate_every_s: 1" + "0" * 5000 + "\n", ":1:19:", "digits"),
    ],
)  # fmt: skip
def test_rules_file_errors_are_located(tmp_path: Path, text: str, where: str, message: str) -> None:
    path = tmp_path / "alerts.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_alert_rules(path, environ={})
    assert str(e.value).startswith(str(path) + where), str(e.value)
    assert message in str(e.value)


def test_serve_refuses_a_bad_rules_file(tmp_path: Path) -> None:
    path = tmp_path / "alerts.yaml"
    path.write_text("rules:\n  - name: a\n    kind: silent\n    for_min: -1\n")
    key = tmp_path / "master.key"
    subprocess.run(cli_command("master-key", "generate", "--out", str(key)), check=True)
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    args = ["serve", "--db", db, "--master-key-file", str(key), "--port", "0", "--alerts"]
    r = subprocess.run(cli_command(*args, str(path)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"{path}:4:14: rules.0.silent.for_min: Input should be greater than 0" in r.stderr


def test_bodies_for_slack_and_pagerduty() -> None:
    from cloud._alert_store import AlertRow

    a = AlertRow(
        key="silent:<b>&x", rule="silent", kind="silent", device="<b>&x", severity="warning",
        state="firing", summary="<b>&x: no upload for 12 min", labels={"device": "<b>&x"},
        value=12.0, started_ms=1_700_000_000_123, updated_ms=1_700_000_000_123,
    )  # fmt: skip
    slack = render("slack", a, dashboard_url="https://c.example")
    assert "<b>" not in slack["text"] and "&lt;b&gt;&amp;x: no upload" in slack["text"]
    assert slack["text"].endswith("<https://c.example/devices/%3Cb%3E%26x|dashboard>")
    pd = render("pagerduty", a, routing_key="R")
    assert pd["event_action"] == "trigger" and pd["dedup_key"] == a.key
    assert pd["payload"]["source"] == "<b>&x" and pd["payload"]["severity"] == "warning"
    assert pd["payload"]["timestamp"] == "2023-11-14T22:13:20.123Z"
    a.state, a.resolved_ms = "resolved", 1_700_000_060_000
    assert render("pagerduty", a, routing_key="R") == {
        "routing_key": "R",
        "event_action": "resolve",
        "dedup_key": a.key,
    }
    from cloud._webhook import _header_text

    assert _header_text("silent:a\r\nX-Injected: 1\u00e9") == "silent:a??X-Injected: 1\\xe9"
    am = render("alertmanager", a)
    assert am["status"] == "resolved" and am["alerts"][0]["endsAt"] == "2023-11-14T22:14:20.000Z"


# -- the alert state, on each backend ---------------------------------------------------------
def test_alert_state_transitions_once(backend: Backend) -> None:
    """Of many evaluations that see the same condition at once, one fires it; resolving is
    also made once; a resolved alert fires again as a new episode, undelivered until marked."""
    import concurrent.futures

    from cloud._alert_store import AlertRow

    name, _ = new_device(backend, "state")
    key = f"r:{name}"

    def row(t: int) -> AlertRow:
        return AlertRow(key=key, rule="r", kind="silent", device=name, severity="info",
                        state="firing", summary="s", labels={"device": name}, started_ms=t,
                        updated_ms=t)  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        fired = list(pool.map(lambda _: backend.fire_alert(row(1000)), range(16)))
    assert fired.count(True) == 1
    assert [a.key for a in backend.undelivered_alerts() if a.device == name] == [key]
    backend.alert_notified(key, "firing", 1000)
    assert [a for a in backend.undelivered_alerts() if a.device == name] == []
    backend.update_alert(key, "s2", 2.5, 1500)
    (a,) = backend.alerts(state="firing", device=name)
    assert (a.summary, a.value, a.notified) == ("s2", 2.5, "firing")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda _: backend.resolve_alert(key, 2000), range(16)))
    assert sum(d is not None for d in done) == 1
    (a,) = backend.alerts(device=name)
    assert (a.state, a.resolved_ms, a.notified) == ("resolved", 2000, "firing")
    backend.alert_notified(key, "firing", 1000)  # a late ack of the firing changes nothing
    assert backend.alerts(device=name)[0].notified == "firing"
    assert backend.fire_alert(row(3000))  # a new episode
    (a,) = backend.alerts(device=name)
    assert (a.state, a.started_ms, a.resolved_ms, a.notified) == ("firing", 3000, None, None)
    backend.alert_notified(key, "firing", 1000)  # the old episode's ack: not this one
    assert backend.alerts(device=name)[0].notified is None


def test_the_documented_rules_file_is_valid(tmp_path: Path) -> None:
    import re

    from tests.helpers.edge import REPO

    doc = (REPO / "docs" / "alerts.md").read_text()
    (text,) = re.findall(r"```yaml file=alerts.yaml\n(.*?)```", doc, re.S)
    path = tmp_path / "alerts.yaml"
    path.write_text(text)
    env = {"EDGEPIPE_ALERT_KEY": "k", "PAGERDUTY_ROUTING_KEY": "r"}
    rules, secrets = load_alert_rules(path, environ=env)
    assert [r.kind for r in rules.rules] == [
        "store_full", "breaker_open", "session_lost", "clock_skew", "silent", "no_readings",
    ]  # fmt: skip
    assert [w.format for w in rules.webhooks] == ["alertmanager", "slack", "pagerduty"]
    assert secrets == {0: (b"k", None), 1: (None, None), 2: (None, "r")}
    # and each error the document quotes is what a receiver prints
    assert "rules.0.silent.for_min: Input should be greater than 0" in doc
    # the documented check of the signature accepts the receiver's, and nothing else
    from cloud._webhook import sign

    (code,) = re.findall(r"```python\n(.*?)```", doc, re.S)
    scope: dict[str, Any] = {}
    exec(code, scope)  # noqa: S102 - the document's own example
    body, t = b'{"status":"firing"}', int(time.time())
    assert scope["verified"](b"key", sign(b"key", body, t), body)
    assert not scope["verified"](b"key", sign(b"key", body, t), body + b" ")
    assert not scope["verified"](b"key", sign(b"key", body, t - 3600), body)
