"""The dashboard's health data against a real receiver (``edgepipe-cloud serve``) fed real
signed uploads of health snapshots and log records: the health panel's series (CPU rate,
counters that reset on a restart, gaps), the fleet's badges under thresholds set in the
environment, each naming its evidence, and the fleet-wide log view's filters and pages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from cloud._badges import Thresholds, badges, raise_badges
from cloud._health_view import MAX_LINES, health_view
from cloud._settings import DashboardSettings
from sync._health import encode_health
from tests.helpers.cloud_client import health_snapshots, log_record, upload_as
from tests.helpers.sync_env import Receiver

TOKEN = "health-operator-token"
MIN = 60_000


@pytest.fixture
def rx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv("EDGEPIPE_CLOUD_API_TOKEN", TOKEN)
    monkeypatch.setenv("EDGEPIPE_CLOUD_BADGE_STORE_FILL", "0.85")  # not the default 0.8
    monkeypatch.setenv("EDGEPIPE_CLOUD_BADGE_CLOCK_SKEW_S", "10")
    with Receiver(tmp_path) as r:
        yield r


def _op(rx: Receiver) -> httpx.Client:
    return httpx.Client(base_url=rx.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def test_health_panel_series_and_fleet_badges(rx: Receiver) -> None:
    now = int(time.time() * 1000)
    upload_as(rx, "gw-full", health=encode_health(health_snapshots(now, fill=0.9)))
    upload_as(rx, "gw-ok", health=encode_health(health_snapshots(now, fill=0.82)))  # > 0.8, < 0.85
    skewed = health_snapshots(now, fill=0.1)
    for _, s in skewed:
        s["clock_skew_ms"] = -45_000
    upload_as(rx, "gw-skew", health=encode_health(skewed))
    with _op(rx) as op:
        r = op.get("/ui/api/health", params={"device": "gw-full", "range": "1h"})
        assert r.status_code == 200, r.text
        h = r.json()
        assert h["snapshots"] == 30 and h["step"] == 5000
        charts = {c["id"]: {s["key"]: s["values"] for s in c["series"]} for c in h["charts"]}
        filled = [i for i, p in enumerate(h["present"]) if p]
        assert len(filled) == 30
        cpu = [charts["cpu"]["cpu_pct"][i] for i in filled]
        assert cpu[0] is None  # the first snapshot has nothing before it in the range
        assert set(cpu[1:20]) == {1.5} and set(cpu[21:]) == {1.5}
        assert cpu[20] == 0.0  # just restarted: CPU time since start, 0
        # counters: one trap a minute, the restart's reset is no negative step
        traps = [charts["traps"]["traps:scale:unreachable"][i] for i in filled]
        assert traps[1:20] == [1] * 19 and traps[20] == 0 and traps[21:] == [1] * 9
        assert h["totals"]["traps"] == [
            {"key": "traps:scale:unreachable", "stage": "scale", "code": "unreachable", "n": 28}
        ]
        assert h["totals"]["drops"][0] | {"n": 0} == {
            "key": "drops:validity:out_of_range", "stage": "validity", "reason": "out_of_range",
            "n": 0,
        }  # fmt: skip
        assert h["totals"]["dead_letters"][0]["n"] == 28
        assert [charts["link"]["link_bytes:wifi"][i] for i in filled][1:] == [2000] * 29
        assert charts["rss"]["rss_kb"][filled[-1]] == (30_000 + 290) * 1024
        assert charts["skew"]["clock_skew_ms"][filled[-1]] == 0.4
        assert h["chain"]["current"] == "bbbb2222"
        assert [c["chain"] for c in h["chain"]["changes"]] == ["aaaa1111", "bbbb2222"]
        assert [b["badge"] for b in h["badges"]] == ["store_full"]
        assert h["thresholds"]["store_fill"] == 0.85

        # the last five minutes: the snapshot before them is the baseline of the first
        h5 = op.get(
            "/ui/api/health",
            params={"device": "gw-full", "since": now - 5 * MIN + 1, "until": now + 1},
        ).json()
        first = h5["present"].index(1)
        t5 = next(c for c in h5["charts"] if c["id"] == "traps")["series"][0]["values"]
        assert t5[first] == 1

        fleet = {d["name"]: d for d in op.get("/ui/api/fleet").json()["devices"]}
        full = fleet["gw-full"]["badges"]
        assert [b["badge"] for b in full] == ["store_full"]
        assert full[0]["seq"] == 30 and full[0]["key"] == "store_used_b"
        assert full[0]["ts"] == now and "90%" in full[0]["text"]
        assert fleet["gw-ok"]["badges"] == []  # 82 % is under the configured 85 %
        assert [b["badge"] for b in fleet["gw-skew"]["badges"]] == ["clock_skew"]
        assert fleet["gw-skew"]["badges"][0]["key"] == "clock_skew_ms"
        assert op.get("/ui/api/fleet").json()["totals"]["attention"] == 2

        # the evidence a badge names is in the read API
        ev = op.get("/v1/devices/gw-full/health", params={"since": now, "until": now + 1}).json()
        assert [s["seq"] for s in ev["snapshots"]] == [30]
        assert ev["snapshots"][0]["values"]["store_used_b"] > 0.85 * (100 << 20)

        for bad in ({"device": "gw-full", "range": "2h"}, {"range": "1h"}):
            assert op.get("/ui/api/health", params=bad).status_code == 400
        assert op.get("/ui/api/health", params={"device": "nobody"}).status_code == 404


def test_fleet_log_view_filters_and_pages(rx: Receiver) -> None:
    now = int(time.time() * 1000)
    a = [
        log_record(i + 1, now - 60_000 + i * 1000, "WARNING", f"stage scale failed ({i})")
        for i in range(7)
    ]
    a.append(log_record(8, now - 30_500, "ERROR", "ALARM: cannot commit: disk I/O error", n=10_000))
    b = [
        log_record(i + 1, now - 60_000 + i * 1000, "WARNING", f"Broker gone 100% ({i})")
        for i in range(3)
    ]
    b.append(log_record(4, now - 10_000, "CRITICAL", "store is not writable_here"))
    upload_as(rx, "gw-a", logs=a)
    upload_as(rx, "gw-b", logs=b)
    with _op(rx) as op:
        everything = op.get("/v1/logs", params={"limit": 1000}).json()
        logs = everything["logs"]
        assert everything["next"] is None and len(logs) == 12
        assert [r["ts"] for r in logs] == sorted((r["ts"] for r in logs), reverse=True)
        assert {r["device"] for r in logs} == {"gw-a", "gw-b"}
        alarm = next(r for r in logs if r["level"] == "ERROR")
        assert alarm["n"] == 10_000 and alarm["device"] == "gw-a"

        # bounded pages, cursor to cursor: every record once, in order
        seen, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 5}
            if cursor:
                params["before"] = cursor
            page = op.get("/v1/logs", params=params).json()
            assert len(page["logs"]) <= 5
            seen += page["logs"]
            cursor = page["next"]
            if cursor is None:
                break
        assert seen == logs

        def get(**p: Any) -> list[dict[str, Any]]:
            r = op.get("/v1/logs", params=p)
            assert r.status_code == 200, r.text
            return r.json()["logs"]

        assert [r["level"] for r in get(level="error")] == ["CRITICAL", "ERROR"]
        assert [r["level"] for r in get(level="CRITICAL")] == ["CRITICAL"]
        assert [r["msg"] for r in get(q="alarm")] == ["ALARM: cannot commit: disk I/O error"]
        assert len(get(q="100%")) == 3 and get(q="1%") == []  # % and _ are literal
        assert [r["msg"] for r in get(q="not_writable")] == []
        assert [r["msg"] for r in get(q="writable_here")] == ["store is not writable_here"]
        assert {r["device"] for r in get(device="gw-b")} == {"gw-b"}
        assert len(get(since=now - 31_000, until=now)) == 2
        per_device = op.get("/v1/devices/gw-a/logs", params={"level": "ERROR"}).json()
        assert [r["n"] for r in per_device["logs"]] == [10_000] and per_device["next"] is None

        for bad in (
            {"level": "DEBUG"},
            {"before": "x.y.z"},
            {"before": "1.2"},
            {"limit": 0},
            {"limit": 1001},
            {"q": "x" * 201},
            {"since": "-1"},
        ):
            r = op.get("/v1/logs", params=bad)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"] == "bad_request"
        assert httpx.get(rx.url + "/v1/logs").status_code == 401


def test_thresholds_are_settings() -> None:
    s = DashboardSettings.from_env(
        {
            "EDGEPIPE_CLOUD_BADGE_STORE_FILL": "0.95",
            "EDGEPIPE_CLOUD_BADGE_CLOCK_SKEW_S": "5",
            "EDGEPIPE_CLOUD_BADGE_SILENT_FACTOR": "4",
            "EDGEPIPE_CLOUD_BADGE_SILENT_MIN_S": "30",
            "EDGEPIPE_CLOUD_BADGE_WINDOW_S": "600",
        }
    )
    th = Thresholds.from_settings(s)
    assert th == Thresholds(0.95, 5000, 4.0, 30_000, 600_000)
    assert Thresholds.from_settings(DashboardSettings()) == Thresholds()
    for bad in ({"badge_store_fill": 0}, {"badge_store_fill": 1.5}, {"badge_window_s": 1}):
        with pytest.raises(ValidationError):
            DashboardSettings(**bad)


def _snap(seq: int, ts: int, **values: Any) -> dict[str, Any]:
    return {"seq": seq, "ts": ts, "values": {"ts": ts, **values}}


def test_silence_is_judged_against_the_device_usual_interval() -> None:
    th = Thresholds(silent_factor=3, silent_min_ms=60_000)
    every_5_min = [_snap(i, i * 300_000) for i in range(1, 11)]
    last = every_5_min[-1]["ts"]
    assert badges(every_5_min, None, last + 14 * MIN, th) == []  # under 3 x 5 min
    got = badges(every_5_min, None, last + 16 * MIN, th)
    assert [b["badge"] for b in got] == ["silent"] and got[0]["seq"] == 10
    assert "usually every 300 s" in got[0]["text"]
    every_10_s = [_snap(i, i * 10_000) for i in range(1, 11)]
    last = every_10_s[-1]["ts"]
    assert badges(every_10_s, None, last + 50_000, th) == []  # the floor: 60 s
    assert [b["badge"] for b in badges(every_10_s, None, last + 70_000, th)] == ["silent"]
    # an upload the receiver saw recently is news, whatever the snapshots' stamps say
    assert badges(every_10_s, None, last + 70_000, th, last_contact_ms=last + 60_000) == []


def test_session_lost_breaker_and_reset_counters() -> None:
    th = Thresholds()
    first = _snap(1, 0, sessions_lost=2)
    assert raise_badges(_snap(2, 60_000, sessions_lost=2), first, now=60_000, thresholds=th) == []
    lost = raise_badges(_snap(2, 60_000, sessions_lost=3), first, now=60_000, thresholds=th)
    assert [b["badge"] for b in lost] == ["session_lost"]
    # a restart reset the counter to 1: one session lost since
    again = raise_badges(_snap(2, 60_000, sessions_lost=1), first, now=60_000, thresholds=th)
    assert [b["text"] for b in again] == ["MQTT session lost"]
    br = raise_badges(
        _snap(2, 60_000, **{"breaker_open:scale": 1, "breaker_open:ema": 0}),
        None,
        now=60_000,
        thresholds=th,
    )
    assert [(b["badge"], b["key"]) for b in br] == [("breaker_open", "breaker_open:scale")]


def test_many_stages_fold_into_other() -> None:
    snaps = [
        _snap(i, i * 1000, **{f"drops:s{k}:bad": i * (k + 1) for k in range(MAX_LINES + 3)})
        for i in range(1, 5)
    ]
    view = health_view(snaps, None, 0, 5000, 1000)
    drops = next(c for c in view["charts"] if c["id"] == "drops")
    assert len(drops["series"]) == MAX_LINES + 1
    assert drops["series"][-1]["label"] == "3 others"
    assert drops["series"][0]["key"] == f"drops:s{MAX_LINES + 2}:bad"  # the most first
    assert len(view["totals"]["drops"]) == MAX_LINES + 3


def test_backend_health_queries_in_both_dialects(
    backend: Any, device: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite and PostgreSQL: the health panel's bucketed read (a range with more snapshots
    than are read one by one), the fleet's overview and the log cursor."""
    from cloud import _health

    now = int(time.time() * 1000)
    logs = [log_record(i + 1, now - 10_000 + (i // 2) * 1000, "WARNING", f"m{i}") for i in range(9)]
    r = device.upload([], health=encode_health(health_snapshots(now, fill=0.5)), logs=logs)
    assert r.status_code == 200, r.text
    name = device.name
    since, until, step = now - 30 * MIN, now + 1, 5 * MIN
    base, every = backend.health_buckets(name, since, until, step)
    assert base is None and [s["seq"] for s in every] == list(range(1, 31))
    monkeypatch.setattr(_health, "EXACT_MAX", 5)
    _, last = backend.health_buckets(name, since, until, step)
    want = {}
    for s in every:
        want[(s["ts"] - since) // step] = s["seq"]  # the last of each bucket
    assert [s["seq"] for s in last] == sorted(want.values())
    base, _ = backend.health_buckets(name, now - 5 * MIN + 1, until, step)
    assert base is not None and base["seq"] == 25
    assert backend.health_buckets("nobody", since, until, step) == (None, [])

    o = backend.health_overview(now - 10 * MIN)[name]
    assert o["newest"]["seq"] == 30 and o["first"]["seq"] == 20
    assert o["count"] == 11 and o["span_ms"] == 10 * MIN
    o = backend.health_overview(now + MIN)[name]  # nothing that recent: the newest only
    assert o["newest"]["seq"] == 30 and o["first"] is None and o["count"] == 0

    pages, before = [], None
    while True:
        page = backend.logs(name, limit=4, before=before)
        pages.append([x["msg"] for x in page])
        if len(page) < 4:
            break
        before = tuple(int(x) for x in page[-1]["cursor"].split("."))
    got = [m for p in pages for m in p]
    assert got == [f"m{i}" for i in (8, 7, 6, 5, 4, 3, 2, 1, 0)]  # same ts: higher seq first
