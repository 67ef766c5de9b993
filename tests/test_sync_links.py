"""Link awareness: a fake /sys/class/net tree (the modem and Wi-Fi interfaces cannot exist
here) drives which link the worker reports, when it sends, and what it sends on a metered
link.  The receiver is real."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from config._models import SyncLinksConfig
from core._clock import ManualClock, utc_day
from sync._link import LinkMonitor
from sync._state import SyncState
from tests.helpers.proxy import Proxy
from tests.helpers.sync_env import (
    Receiver,
    WorkerThread,
    fill_sync,
    sync_cfg,
    sync_count,
    unsynced,
    wait_until,
)

DEVICE = "edge-1"  # registered by the receiver fixture (conftest.py)


class FakeSys:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "class" / "net").mkdir(parents=True, exist_ok=True)

    def set(self, name: str, operstate: str, carrier: str | None = None) -> None:
        d = self.root / "class" / "net" / name
        d.mkdir(exist_ok=True)
        (d / "operstate").write_text(operstate + "\n")
        c = d / "carrier"
        if carrier is None:
            c.unlink(missing_ok=True)
        else:
            c.write_text(carrier + "\n")


@pytest.fixture
def fake_sys(tmp_path: Path) -> FakeSys:
    return FakeSys(tmp_path / "sys")


def links(fake: FakeSys, **kw) -> dict:
    return {"sysfs_root": str(fake.root), "poll_s": 0.1, **kw}


def link_polls() -> float:
    """How often the in-process worker has read the (fake) sysfs while waiting."""
    return sync_count("edgepipe_sync_link_polls_total")


def probes_ok() -> float:
    """Successful probes of the receiver: the worker probes first when a link comes up."""
    return sync_count("edgepipe_sync_probes_total", result="ok")


def test_link_detection(fake_sys: FakeSys) -> None:
    mon = LinkMonitor(SyncLinksConfig(sysfs_root=fake_sys.root))
    assert mon.current().kind == "unknown" and mon.current().up  # nothing matches: probe decides
    fake_sys.set("lo", "unknown", "1")
    fake_sys.set("eth0", "down")
    fake_sys.set("wlan0", "down")
    cur = mon.current()
    assert not cur.up
    fake_sys.set("wwan0", "up", "1")
    cur = mon.current()
    assert (cur.kind, cur.interface, cur.up, cur.metered) == ("cellular", "wwan0", True, True)
    fake_sys.set("wlan0", "up", "1")
    assert mon.current().kind == "wifi"
    fake_sys.set("wlan0", "up", "0")  # associated but no carrier
    assert mon.current().kind == "cellular"
    fake_sys.set("eth0", "up")  # no carrier file: operstate decides
    cur = mon.current()
    assert (cur.kind, cur.metered) == ("ethernet", False)
    fake_sys.set("eth0", "down")
    fake_sys.set("wwan0", "down")
    fake_sys.set("ppp0", "unknown", "1")  # PPP never says "up"
    assert mon.current().interface == "ppp0"
    fake_sys.set("ppp0", "unknown", "0")
    assert not mon.current().up
    assert "ppp0 (cellular) down" in mon.describe_down()


def test_patterns_and_preference_from_config(fake_sys: FakeSys) -> None:
    cfg = SyncLinksConfig(
        sysfs_root=fake_sys.root,
        interfaces={"wifi": ["wlp*"], "cellular": ["rmnet*"]},
        prefer=["cellular", "wifi"],
        metered=[],
    )
    fake_sys.set("wlp2s0", "up", "1")
    fake_sys.set("rmnet_data0", "up", "1")
    fake_sys.set("eth0", "up", "1")  # matches no configured pattern: ignored
    cur = LinkMonitor(cfg).current()
    assert (cur.kind, cur.interface, cur.metered) == ("cellular", "rmnet_data0", False)


def test_nothing_sent_while_down_and_link_up_wakes_worker(
    tmp_path: Path, fake_sys: FakeSys, receiver: Receiver
) -> None:
    total = fill_sync(tmp_path, 5, 100)
    fake_sys.set("wlan0", "down")
    fake_sys.set("eth0", "down")
    with Proxy(("127.0.0.1", receiver.port)) as proxy:
        cfg = sync_cfg(proxy.url, receiver.secret, links=links(fake_sys))
        with WorkerThread(tmp_path, cfg) as w:
            wait_until(lambda: w.worker.status.waiting, 10, "the worker to notice no link")
            assert "no network link is up" in w.worker.status.waiting
            polls = link_polls()
            wait_until(lambda: link_polls() >= polls + 3, 20, "the worker to look again")
            assert proxy.connections == 0  # no attempt at all while every link is down
            probes = probes_ok()
            fake_sys.set("wlan0", "up", "1")
            wait_until(lambda: unsynced(tmp_path) == (0, 0), 20, "upload once Wi-Fi is up")
            assert probes_ok() == probes + 1  # woken by the link: probed, then uploaded
    assert receiver.counts()["readings"] == total
    assert receiver.device_row(DEVICE)["last_link"] == "wifi"  # X-Edgepipe-Link
    st = SyncState.load(tmp_path / "store.db.sync.json")
    assert (st.link, st.interface, st.waiting) == ("wifi", "wlan0", None)
    assert st.bytes_today.get("wifi", 0) > 0


def test_link_coming_back_ends_the_backoff(
    tmp_path: Path, fake_sys: FakeSys, receiver: Receiver
) -> None:
    """Receiver unreachable -> long backoff; the interface drops and comes back -> the worker
    probes and uploads at once instead of sleeping out its backoff."""
    total = fill_sync(tmp_path, 3, 100)
    fake_sys.set("eth0", "up", "1")
    with Proxy(("127.0.0.1", receiver.port)) as proxy:
        proxy.cut()
        cfg = sync_cfg(
            proxy.url,
            receiver.secret,
            links=links(fake_sys),
            backoff_min_s=600,
            backoff_max_s=600,
        )
        with WorkerThread(tmp_path, cfg) as w:
            wait_until(lambda: w.worker.status.last_error, 20, "a failed attempt")
            polls = link_polls()
            fake_sys.set("eth0", "down")
            proxy.restore()
            # two reads of sysfs since: at least one of them saw eth0 down
            wait_until(lambda: link_polls() >= polls + 2, 20, "the worker to see eth0 down")
            probes = probes_ok()
            fake_sys.set("eth0", "up", "1")
            wait_until(lambda: unsynced(tmp_path) == (0, 0), 20, "upload after the link is back")
            assert probes_ok() == probes + 1  # probed first, as after any network failure
    assert receiver.counts()["readings"] == total
    st = SyncState.load(tmp_path / "store.db.sync.json")
    assert (st.link, st.interface, st.online) == ("ethernet", "eth0", True)


def test_metered_priority_then_bulk_on_wifi(
    tmp_path: Path, fake_sys: FakeSys, receiver: Receiver
) -> None:
    """On cellular: alerts (flagged) first, then recent data, each in seq order; bulk
    history waits for Wi-Fi, then goes oldest first.  Every reading arrives once."""
    now = int(time.time() * 1000)
    old = now - 10 * 24 * 3600_000
    # seqs 1-4 old bulk, 5-6 old alerts, 7-8 old bulk, 9-10 recent, 11 recent alert
    v = fill_sync(tmp_path, 4, 50, ts0=old)
    v = fill_sync(tmp_path, 2, 50, start_value=v, ts0=old, flagged=lambda b: True)
    v = fill_sync(tmp_path, 2, 50, start_value=v, ts0=old)
    v = fill_sync(tmp_path, 2, 50, start_value=v, ts0=now - v * 1000)
    total = fill_sync(tmp_path, 1, 50, start_value=v, ts0=now - v * 1000, flagged=lambda b: True)
    fake_sys.set("wlan0", "down")
    fake_sys.set("wwan0", "up", "1")
    cfg = sync_cfg(
        receiver.url,
        receiver.secret,
        links=links(fake_sys),
        batches_per_request=1,
        metered={"priority": ["alerts", "recent"], "recent_hours": 6},
    )
    with WorkerThread(tmp_path, cfg) as w:
        wait_until(lambda: unsynced(tmp_path)[0] == 6, 20, "alerts and recent over cellular")
        wait_until(lambda: w.worker.status.waiting, 10, "the worker to report what waits")
        assert "bulk batches wait for an unmetered link" in w.worker.status.waiting
        assert receiver.batch_seqs_in_arrival_order() == [5, 6, 11, 9, 10]
        assert receiver.device_row(DEVICE)["last_link"] == "cellular"
        fake_sys.set("wlan0", "up", "1")
        wait_until(lambda: unsynced(tmp_path) == (0, 0), 20, "bulk over Wi-Fi")
    assert receiver.batch_seqs_in_arrival_order() == [5, 6, 11, 9, 10, 1, 2, 3, 4, 7, 8]
    c = receiver.counts()
    assert c["readings"] == c["distinct"] == total
    assert receiver.device_row(DEVICE)["last_link"] == "wifi"


def _clock_on_one_day() -> ManualClock:
    """A worker clock that stays on one UTC day while a test moves it by up to 100 s: now
    (the receiver checks signed timestamps within 300 s of its clock), or 150 s earlier
    when midnight is closer than that."""
    now = time.time()
    return ManualClock(now - 150 if 86400 - now % 86400 < 150 else now)


def test_metered_daily_budget(tmp_path: Path, fake_sys: FakeSys, receiver: Receiver) -> None:
    # the budget counts the UTC day of the worker's clock: pinned, midnight cannot reset it
    clock = _clock_on_one_day()
    day = utc_day(int(clock.time() * 1000))
    fill_sync(tmp_path, 10, 200)
    fake_sys.set("wwan0", "up", "1")
    budget = 20_000
    cfg = sync_cfg(
        receiver.url,
        receiver.secret,
        links=links(fake_sys),
        compression="none",
        batches_per_request=1,
        metered={"priority": ["alerts", "recent", "bulk"], "daily_budget_mb": budget / 2**20},
    )
    with WorkerThread(tmp_path, cfg, clock=clock) as w:
        wait_until(lambda: w.worker.status.waiting, 20, "the budget to run out")
        assert "daily budget of the cellular link is used up" in w.worker.status.waiting
        sent_batches = receiver.counts()["batches"]
    st = SyncState.load(tmp_path / "store.db.sync.json")
    assert st.day == day
    assert 0 < st.bytes_today["cellular"] <= budget
    assert 0 < sent_batches < 10
    assert unsynced(tmp_path)[0] == 10 - sent_batches
    # a restart does not reset the budget: it lives in the state file
    held = sync_count("edgepipe_sync_waits_total", reason="budget")

    def held_back_twice() -> bool:
        clock.advance(0.25)  # ends the worker's wait between two looks (interval_s 0.2)
        return sync_count("edgepipe_sync_waits_total", reason="budget") >= held + 2

    with WorkerThread(tmp_path, cfg, clock=clock):
        wait_until(held_back_twice, 20, "the restarted worker to hold back twice for the budget")
        assert receiver.counts()["batches"] == sent_batches
