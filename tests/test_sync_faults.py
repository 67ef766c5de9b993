"""Network faults between the edge sync worker and a real receiver, on loopback.

Every scenario ends with: each reading stored exactly once at the receiver (count and
distinct count of unique values), batches stored in seq order, the worker alive, and
nothing left unsynced at the edge.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.proxy import Proxy
from tests.helpers.sync_env import (
    Receiver,
    WorkerThread,
    edgepipe,
    fill_sync,
    sample_rss,
    sync_cfg,
    sync_count,
    sync_state,
    unsynced,
    wait_until,
    write_pipeline,
)


def assert_exactly_once(receiver: Receiver, tmp: Path, total: int) -> None:
    c = receiver.counts()
    print(f"sent={total} received={c['readings']} duplicates={c['readings'] - c['distinct']}")
    assert c["readings"] == total, c
    assert c["distinct"] == total, c  # no duplicates
    seqs = receiver.batch_seqs_in_arrival_order()
    assert seqs == sorted(seqs), "batches were stored out of seq order"
    assert unsynced(tmp) == (0, 0)


def drained(receiver: Receiver, total: int):
    return lambda: receiver.counts()["readings"] >= total


def network_errors() -> float:
    """Uploads of the in-process worker that failed on the network (reset, refused...)."""
    return sync_count("edgepipe_sync_errors_total", kind="network")


def failed_probes() -> float:
    """Probes of the receiver that failed: each retry after a network error probes first."""
    return sync_count("edgepipe_sync_probes_total", result="failed")


def test_cut_then_restore(tmp_path: Path, receiver: Receiver) -> None:
    total = fill_sync(tmp_path, 40, 500)
    with Proxy(("127.0.0.1", receiver.port)) as proxy:
        proxy.cut()
        cfg = sync_cfg(proxy.url, receiver.secret, batches_per_request=4)
        with WorkerThread(tmp_path, cfg) as w:
            wait_until(lambda: w.worker.status.last_error, 20, "a failed attempt")
            assert "cannot reach" in w.worker.status.last_error
            assert receiver.counts()["readings"] == 0
            proxy.restore()
            wait_until(drained(receiver, total), 60, "the backlog to drain")
            wait_until(lambda: unsynced(tmp_path) == (0, 0), 20, "edge marks synced")
            # cut in the middle of a second backlog (slowed down so that it is still going)
            proxy.delay(50)
            total2 = fill_sync(tmp_path, 40, 500, start_value=total)
            w.worker.notify()
            wait_until(lambda: receiver.counts()["readings"] > total, 30, "progress")
            failed = network_errors()
            proxy.cut()
            wait_until(lambda: network_errors() > failed, 30, "the cut to fail an upload")
            assert receiver.counts()["readings"] < total2
            proxy.restore()
            proxy.delay(0)
            wait_until(drained(receiver, total2), 60, "the second backlog")
            wait_until(lambda: unsynced(tmp_path) == (0, 0), 20, "edge marks synced")
        assert w.thread.is_alive() is False and w.error is None
    assert_exactly_once(receiver, tmp_path, total2)


def test_delay(tmp_path: Path, receiver: Receiver) -> None:
    total = fill_sync(tmp_path, 20, 500)
    with Proxy(("127.0.0.1", receiver.port)) as proxy:
        proxy.delay(150)
        cfg = sync_cfg(proxy.url, receiver.secret, batches_per_request=4)
        with WorkerThread(tmp_path, cfg):
            wait_until(drained(receiver, total), 60, "the backlog to drain")
            wait_until(lambda: unsynced(tmp_path) == (0, 0), 20, "edge marks synced")
    assert_exactly_once(receiver, tmp_path, total)


def test_delay_longer_than_timeout(tmp_path: Path, receiver: Receiver) -> None:
    """Responses slower than the client's timeout: the upload is retried, not duplicated."""
    total = fill_sync(tmp_path, 6, 200)
    with Proxy(("127.0.0.1", receiver.port)) as proxy:
        proxy.delay(1500)
        cfg = sync_cfg(proxy.url, receiver.secret, batches_per_request=2, timeout_s=1.0)
        with WorkerThread(tmp_path, cfg) as w:
            wait_until(lambda: w.worker.status.last_error, 30, "a timeout")
            assert "timed out" in w.worker.status.last_error
            proxy.delay(0)
            wait_until(drained(receiver, total), 60, "the backlog to drain")
            wait_until(lambda: unsynced(tmp_path) == (0, 0), 30, "edge marks synced")
    assert_exactly_once(receiver, tmp_path, total)


def test_flap(tmp_path: Path, receiver: Receiver) -> None:
    """Link up 2 s / down 3 s while the worker uploads and new data keeps arriving."""
    total = fill_sync(tmp_path, 30, 1000)
    with Proxy(("127.0.0.1", receiver.port)) as proxy:
        proxy.delay(20)  # so that cuts land mid-request
        proxy.flap(2, 3)
        cfg = sync_cfg(proxy.url, receiver.secret, batches_per_request=2)
        with WorkerThread(tmp_path, cfg) as w:
            # new data keeps arriving while the worker uploads, until two down phases of the
            # flapping link have cut it off
            hit_at_start = network_errors()
            for _ in range(200):
                if network_errors() >= hit_at_start + 2:
                    break
                hit = network_errors()
                total = fill_sync(tmp_path, 1, 1000, start_value=total)
                w.worker.notify()
                wait_until(
                    lambda h=hit, t=total: (
                        network_errors() > h or receiver.counts()["readings"] >= t
                    ),
                    60,
                    "the new batch uploaded or cut off by a flap",
                )
            assert network_errors() >= hit_at_start + 2, "the flaps never cut an upload off"
            wait_until(drained(receiver, total), 90, "the backlog to drain through flaps")
            wait_until(lambda: unsynced(tmp_path) == (0, 0), 30, "edge marks synced")
            proxy.stop_flap()
        assert w.worker.status.last_error is not None  # the flaps did hit it
    assert_exactly_once(receiver, tmp_path, total)


def test_response_lost_after_request_was_stored(tmp_path: Path, receiver: Receiver) -> None:
    """The receiver commits, the answer is lost: the retry is acked as duplicate and the
    readings are stored once."""
    total = fill_sync(tmp_path, 8, 500)
    with Proxy(("127.0.0.1", receiver.port)) as proxy:
        proxy.cut_responses(3)
        cfg = sync_cfg(proxy.url, receiver.secret, batches_per_request=2)
        with WorkerThread(tmp_path, cfg):
            wait_until(drained(receiver, total), 60, "the backlog to drain")
            wait_until(lambda: unsynced(tmp_path) == (0, 0), 30, "edge marks synced")
        assert proxy.responses_dropped == 3
    assert_exactly_once(receiver, tmp_path, total)


def test_receiver_killed_mid_request_and_restarted(tmp_path: Path, receiver: Receiver) -> None:
    total = fill_sync(tmp_path, 60, 1000)
    with Proxy(("127.0.0.1", receiver.port)) as proxy:
        proxy.delay(30)
        cfg = sync_cfg(proxy.url, receiver.secret, batches_per_request=2)
        with WorkerThread(tmp_path, cfg) as w:
            wait_until(lambda: receiver.counts()["readings"] > 0, 30, "first uploads")
            receiver.kill9()
            stored_at_kill = receiver.counts()["readings"]
            wait_until(lambda: w.worker.status.last_error, 20, "the worker to notice")
            probes = failed_probes()
            wait_until(lambda: failed_probes() >= probes + 2, 30, "two retries in the dark")
            assert receiver.counts()["readings"] == stored_at_kill
            receiver.start()
            wait_until(drained(receiver, total), 90, "the backlog after the restart")
            wait_until(lambda: unsynced(tmp_path) == (0, 0), 30, "edge marks synced")
    assert stored_at_kill < total
    assert_exactly_once(receiver, tmp_path, total)


@pytest.mark.slow
def test_million_reading_backlog_then_link_returns(tmp_path: Path, receiver: Receiver) -> None:
    """~1M readings committed while offline; `edgepipe sync --now --wait` (its own process)
    drains them when the link returns, with flat memory."""
    total = fill_sync(tmp_path, 1000, 1000)
    assert unsynced(tmp_path) == (1000, 1_000_000)
    with Proxy(("127.0.0.1", receiver.port)) as proxy:
        proxy.cut()
        config = write_pipeline(tmp_path, proxy.url, receiver.secret, batches_per_request=16)
        proc = edgepipe("sync", "--now", "-c", str(config), "--wait", "120", "-q")
        failures: set[int] = set()  # when each failed attempt was recorded in the state file

        def retried_offline() -> bool:
            assert proc.poll() is None, proc.communicate()[1].decode()
            st = sync_state(tmp_path)
            if st.last_error_ms is not None:
                failures.add(st.last_error_ms)
            return len(failures) >= 2

        # offline: the worker fails, backs off and tries again, and is still waiting
        wait_until(retried_offline, 60, "two failed attempts while offline")
        assert "cannot reach" in (sync_state(tmp_path).last_error or "")
        assert receiver.counts()["readings"] == 0
        proxy.restore()
        samples = sample_rss(proc, 0.05)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert len(samples) > 5
    start, peak = samples[0], max(samples)
    print(f"worker RSS: start {start} kB, peak {peak} kB over {len(samples)} samples")
    assert peak - start < 30 * 1024, f"RSS grew from {start} kB to {peak} kB while draining"
    assert_exactly_once(receiver, tmp_path, total)


def test_worker_survives_receiver_down_at_start(tmp_path: Path, receiver: Receiver) -> None:
    """A worker started before the receiver exists keeps trying and then delivers."""
    total = fill_sync(tmp_path, 5, 100)
    receiver.kill9()
    cfg = sync_cfg(receiver.url, receiver.secret)
    with WorkerThread(tmp_path, cfg) as w:
        wait_until(lambda: w.worker.status.last_error, 20, "a failed attempt")
        receiver.start()
        wait_until(drained(receiver, total), 60, "the backlog")
        wait_until(lambda: unsynced(tmp_path) == (0, 0), 30, "edge marks synced")
    assert_exactly_once(receiver, tmp_path, total)
