"""Device health from the edge to the operator, with a real receiver (``edgepipe-cloud serve``
with alert rules) and a real webhook on loopback: a real ``edgepipe run`` whose store fills
towards its quota raises the ``store_full`` badge and fires the webhook; 10,000 repeats of
one warning of a real ``edgepipe run`` arrive as one record with its count; a device offline
for an hour (the sync worker on a test clock, real store and receiver) shows that hour's
health once it is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from core._clock import ManualClock
from core._errors import SyncError
from devtools._mosquitto import Mosquitto
from sync._health import HealthSampler
from sync._logs import LogCollector
from tests.helpers.cloud_client import TOKEN
from tests.helpers.edge import EdgeProcess, free_port, make_config, publish, reading_msg
from tests.helpers.sync_env import Receiver, make_worker, open_store, sync_cfg
from tests.helpers.webhook import WebhookRecorder

DEVICE = "edge-1"


@pytest.fixture
def hook() -> Iterator[WebhookRecorder]:
    with WebhookRecorder() as h:
        yield h


@pytest.fixture
def rx(
    tmp_path: Path, hook: WebhookRecorder, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Receiver]:
    """``edgepipe-cloud serve --alerts`` with a store_full rule firing to ``hook``, the
    operator token for the read API, and ``edge-1`` registered (``rx.secret``)."""
    rules = tmp_path / "alerts.yaml"
    rules.write_text(
        yaml.safe_dump(
            {
                "evaluate_every_s": 1,
                "rules": [{"name": "store-full", "kind": "store_full", "above": 0.8}],
                "webhooks": [{"url": hook.url, "retry_min_s": 0.1, "retry_max_s": 1}],
            }
        )
    )
    monkeypatch.setenv("EDGEPIPE_CLOUD_API_TOKEN", TOKEN)
    r = Receiver(tmp_path, extra=["--alerts", str(rules)])
    r.secret = r.add_device(DEVICE)  # type: ignore[attr-defined]
    with r:
        yield r


def _api(rx: Receiver, path: str, **params: Any) -> dict[str, Any]:
    r = httpx.get(
        rx.url + path, params=params, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert r.status_code == 200, r.text
    return r.json()


def _edge_config(
    tmp_path: Path, mosquitto: Mosquitto, keyfile: Path, rx: Receiver, **over: Any
) -> Path:
    secret = tmp_path / "device.secret"
    secret.write_text(rx.secret + "\n")  # type: ignore[attr-defined]
    secret.chmod(0o600)
    sync = {
        "url": rx.url,
        "device_secret": {"file": str(secret)},
        "interval_s": 0.2,
        "backoff_min_s": 0.2,
        "backoff_max_s": 1.0,
        "health_interval_s": 1,
    } | over.pop("sync", {})
    store = {"path": str(tmp_path / "store.db"), "key": {"file": str(keyfile)}} | over.pop(
        "store", {}
    )
    mqtt = over.pop("broker", None)
    path = make_config(
        tmp_path, mosquitto, keyfile, device={"id": DEVICE}, store=store, sync=sync, **over
    )
    if mqtt is not None:  # (make_config's own argument of that name is the test broker)
        cfg = yaml.safe_load(path.read_text())
        cfg["broker"] = mqtt
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_store_filling_raises_the_badge_and_fires_the_webhook(
    tmp_path: Path,
    broker: Mosquitto,
    keyfile: Path,
    rx: Receiver,
    hook: WebhookRecorder,
    edge: Callable[[Path], EdgeProcess],
) -> None:
    cfg = _edge_config(tmp_path, broker, keyfile, rx, store={"quota_mb": 0.25})
    proc = edge(cfg)
    proc.wait_subscribed()

    def badges() -> list[dict[str, Any]]:
        return _api(rx, f"/v1/devices/{DEVICE}/health")["badges"]

    sent = 0
    while not any(b["badge"] == "store_full" for b in badges()):
        assert sent < 200_000, f"the store never filled: {badges()}\n{proc.output()}"
        publish(broker, [reading_msg(DEVICE, "pm25", sent + i, float(i)) for i in range(5000)])
        sent += 5000
        stored = proc.wait_metric("edgepipe_readings_stored_total", sent, 60)
        assert stored >= sent
        # until a snapshot taken after these readings has reached the receiver
        proc.wait_metric("edgepipe_sync_device_records_total", 1, 30, kind="health")
        n = proc.metric("edgepipe_sync_device_records_total", kind="health")
        proc.wait_metric("edgepipe_sync_device_records_total", n + 2, 30, kind="health")
    (badge,) = [b for b in badges() if b["badge"] == "store_full"]
    assert badge["key"] == "store_used_b" and "of its quota" in badge["text"]
    snaps = {s["seq"]: s for s in _api(rx, f"/v1/devices/{DEVICE}/health")["snapshots"]}
    v = snaps[badge["seq"]]["values"]  # the badge's evidence
    assert v["store_used_b"] / v["store_quota_b"] > 0.8 and v["store_quota_b"] == 262_144

    (fired, *_) = hook.wait(1)
    (alert,) = fired["alerts"]
    assert fired["status"] == "firing"
    assert alert["labels"]["alertname"] == "store-full" and alert["labels"]["device"] == DEVICE
    assert "of its quota (above 80%)" in alert["annotations"]["summary"]
    (row,) = _api(rx, "/v1/alerts", state="firing")["alerts"]
    assert row["key"] == f"store-full:{DEVICE}"
    proc.terminate()


def test_ten_thousand_repeats_arrive_as_one_record(
    tmp_path: Path,
    broker: Mosquitto,
    keyfile: Path,
    rx: Receiver,
    edge: Callable[[Path], EdgeProcess],
) -> None:
    """No broker where the edge looks for one: it warns at every reconnect attempt (tiny
    backoff here); the warning log keeps one record per template with a count, uploaded
    with the snapshot taken at shutdown."""
    cfg = _edge_config(
        tmp_path,
        broker,
        keyfile,
        rx,
        broker={
            "host": "127.0.0.1",
            "port": free_port(),  # nothing listens there
            "client_id": "edgepipe-test-repeats",
            "reconnect_min_s": 0.0001,
            "reconnect_max_s": 0.0001,
        },
        sync={"health_interval_s": 3600},  # one snapshot at start, one at shutdown
    )
    proc = edge(cfg)
    failures = proc.wait_metric("edgepipe_mqtt_connect_failures_total", 10_000, 120)
    assert proc.terminate(60) == 0, proc.output()

    logs = _api(rx, f"/v1/devices/{DEVICE}/logs", q="cannot connect to MQTT broker")["logs"]
    assert 1 <= len(logs) <= 2, logs  # the snapshot at start may have taken the first few
    big = max(logs, key=lambda r: r["n"])
    assert big["n"] >= 10_000 and sum(r["n"] for r in logs) >= failures
    assert big["level"] == "WARNING" and big["logger"].startswith("edgepipe")
    assert big["msg"].startswith("cannot connect to MQTT broker 127.0.0.1:<redacted>: ")
    assert big["msg"].endswith("; retrying in <redacted>s")
    assert big["last"] > big["ts"]  # the first and the last of the repeats


def test_an_hour_offline_fills_in_when_the_device_is_back(tmp_path: Path, rx: Receiver) -> None:
    """The sync worker on a test clock (``edgepipe run`` reads the system clock): an hour of
    snapshots, one a minute, taken while the receiver is down, then uploaded when it is back;
    the read API serves that hour.  The clock starts an hour in the past and is at the
    present when the device is back, so its signed timestamps are fresh."""
    clock = ManualClock(time.time() - 3600 - 60)

    def worker(store: Any) -> Any:
        w = make_worker(store, sync_cfg(rx.url, rx.secret), DEVICE, clock=clock)  # type: ignore[attr-defined]
        w.health = HealthSampler(store_path=store.path)
        w.logs = LogCollector(clock=clock.time)
        return w

    async def offline() -> list[int]:
        store = await open_store(tmp_path, DEVICE)
        try:
            w = worker(store)
            stamps = []
            for _ in range(60):
                await w.record_now()
                stamps.append(int(clock.time() * 1000))
                clock.advance(60)
            with pytest.raises(SyncError):
                await w.sync_once()
            w.close()
            return stamps
        finally:
            await store.close()

    rx.stop()
    stamps = asyncio.run(offline())
    rx.start()
    clock.advance(max(0.0, time.time() - clock.time()))  # the device's clock is right

    async def back() -> None:
        store = await open_store(tmp_path, DEVICE)
        try:
            w = worker(store)
            assert await w.sync_once() == 0  # no readings: the records only
            assert await store.unsynced_records("health") == []
            w.close()
        finally:
            await store.close()

    asyncio.run(back())
    got = _api(rx, f"/v1/devices/{DEVICE}/health", since=stamps[0], until=stamps[-1] + 1)
    ts = [s["ts"] for s in got["snapshots"]]
    assert ts == stamps and ts[-1] - ts[0] == 59 * 60_000
    assert all(s["values"]["rss_kb"] > 0 for s in got["snapshots"])
    assert [b["badge"] for b in got["badges"]] == []  # back, and nothing is wrong
