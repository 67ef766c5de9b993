"""At-least-once without duplicates, on a real mosquitto and real edgepipe processes.

Every message carries a unique ``seq`` that becomes the reading's value, so the store can be
checked for *exactly* the published set: nothing missing, nothing twice.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from devtools._mosquitto import Mosquitto
from tests.helpers.edge import free_port, make_config, metric, wait_for
from tests.helpers.mqtt import Publisher, config, drain, publish_now, seq_message, started
from tests.helpers.store import assert_exactly, stored_values


# -- tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_kill9_repeatedly_stores_every_message_exactly_once(
    tmp_path, broker, keyfile, edge, protocol
):
    n = 8000
    rng = random.Random(4)
    cfg = config(
        tmp_path,
        broker,
        keyfile,
        broker={
            "protocol": protocol,
            "client_id": f"edgepipe-kill9-{protocol}",
        },
    )
    db = tmp_path / "store.db"
    proc = started(edge, cfg)
    pub = Publisher(broker, [seq_message(i) for i in range(n)], rate=2500)
    pub.start()
    kills = 0
    for _ in range(5):
        time.sleep(rng.uniform(0.2, 0.9))  # a random moment to kill at (input), not a wait
        proc.kill9()
        kills += 1
        proc = started(edge, cfg)
    pub.join_ok()
    wait_for(lambda: len(stored_values(db, keyfile)) >= n, 60, "all readings stored")
    drain(broker, proc, n)  # anything late (a duplicate) would come before the marker
    assert proc.terminate() == 0
    assert kills == 5
    assert_exactly(stored_values(db, keyfile), n + 1)


def test_crash_between_commit_and_ack_is_stored_once(tmp_path, broker, keyfile, edge, monkeypatch):
    n = 1000
    cfg = make_config(tmp_path, broker, keyfile, batch={"max_messages": 100, "max_delay_ms": 5})
    db = tmp_path / "store.db"
    monkeypatch.setenv("EDGEPIPE_FAULT", "crash_after_commit:3")
    proc = started(edge, cfg)
    monkeypatch.delenv("EDGEPIPE_FAULT")
    pub = Publisher(broker, [seq_message(i) for i in range(n)], rate=5000)
    pub.start()
    wait_for(lambda: not proc.alive(), 30, "the fault hook to crash edgepipe")
    assert proc.proc.returncode == 137
    assert "EDGEPIPE_FAULT" in proc.output()
    committed = stored_values(db, keyfile)
    assert 0 < len(committed) < n  # three batches committed, none acknowledged
    port = free_port()
    cfg = config(
        tmp_path,
        broker,
        keyfile,
        metrics={"listen": f"127.0.0.1:{port}"},
        batch={"max_messages": 100, "max_delay_ms": 5},
    )
    proc = started(edge, cfg)
    pub.join_ok()
    wait_for(lambda: len(stored_values(db, keyfile)) >= n, 30, "all readings stored")
    drain(broker, proc, n)
    skipped = metric(port, "edgepipe_redeliveries_skipped_total")
    assert proc.terminate() == 0
    assert_exactly(stored_values(db, keyfile), n + 1)
    # the committed-but-unacknowledged messages came back and were recognised as stored
    assert skipped >= 1


def test_broker_restart_mid_stream_loses_and_duplicates_nothing(
    tmp_path, keyfile, edge, monkeypatch
):
    n = 6000
    with Mosquitto() as b:
        cfg = config(
            tmp_path,
            b,
            keyfile,
            broker={
                "client_id": "edgepipe-broker-restart",
                "reconnect_min_s": 0.1,
                "reconnect_max_s": 1.0,
            },
            batch={"max_messages": 200, "max_delay_ms": 5},
        )
        db = tmp_path / "store.db"
        monkeypatch.setenv("EDGEPIPE_FAULT", "slow_commit:40")
        proc = started(edge, cfg)
        monkeypatch.delenv("EDGEPIPE_FAULT")
        # the restart lands in the middle of a backlog, whatever the CPU's speed: the first
        # few hundred readings are stored, then the edge is paused (SIGSTOP) while the rest
        # of the first half piles up in the broker's queue and the edge's socket, and the
        # broker restarts before the edge runs again
        lead = 300
        publish_now(b, [seq_message(i) for i in range(lead)])
        wait_for(lambda: len(stored_values(db, keyfile)) >= lead, 60, "the first readings")
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            first = Publisher(b, [seq_message(i) for i in range(lead, n // 2)], rate=20000)
            first.start()
            first.join_ok()
            assert len(stored_values(db, keyfile)) < n // 2  # a backlog at the restart
            b.restart()
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
        second = Publisher(b, [seq_message(i) for i in range(n // 2, n)], rate=20000)
        second.start()
        second.join_ok()
        wait_for(lambda: len(stored_values(db, keyfile)) >= n, 60, "all readings stored")
        drain(b, proc, n)
        assert proc.alive()
        # reconnected after the restart, and the broker had kept the session each time
        assert proc.metric("edgepipe_mqtt_connects_total") >= 2
        assert proc.metric("edgepipe_mqtt_sessions_lost_total") == 0
        assert proc.terminate() == 0
        assert_exactly(stored_values(db, keyfile), n + 1)


def _window_closed(proc) -> None:  # noqa: ANN001
    wait_for(
        lambda: proc.metric("edgepipe_redelivery_window_open") == 0,
        30,
        "the redelivery window to close",
    )


def test_redelivery_window_catches_a_resend_without_dup(tmp_path, broker, keyfile, edge):
    """A broker restored from its save file may resend an already committed message as a
    first delivery (no DUP).  Right after a connect edgepipe checks every message against
    the store; after the window, a byte-identical message is a genuine repeat and kept."""
    cfg = config(
        tmp_path, broker, keyfile, broker={"client_id": "edgepipe-window", "redelivery_window_s": 3}
    )
    db = tmp_path / "store.db"
    same = seq_message(1)
    proc = started(edge, cfg)
    _window_closed(proc)  # past this connection's redelivery window
    publish_now(broker, [same, seq_message(2)])
    wait_for(lambda: len(stored_values(db, keyfile)) >= 2, 20, "first readings")
    assert proc.metric("edgepipe_redelivery_checks_total") == 0  # nothing was looked up
    assert proc.terminate() == 0

    proc = started(edge, cfg)  # a new connection: its window is open
    assert proc.metric("edgepipe_redelivery_window_open") == 1
    publish_now(broker, [same, seq_message(3)])  # `same` without DUP, as after a restore
    wait_for(lambda: len(stored_values(db, keyfile)) >= 3, 20, "seq 3")
    # both were looked up because of the window (not a DUP flag), and `same` was skipped
    assert proc.metric("edgepipe_redelivery_checks_total", reason="window") == 2
    assert proc.metric("edgepipe_redelivery_checks_total", reason="dup") == 0
    assert proc.metric("edgepipe_redeliveries_skipped_total") == 1
    _window_closed(proc)
    publish_now(broker, [same, seq_message(4)])  # a genuine repeat: kept
    wait_for(lambda: len(stored_values(db, keyfile)) >= 5, 20, "seq 4 and the repeat")
    drain(broker, proc, 5)
    assert proc.metric("edgepipe_redelivery_checks_total") == 2  # none after the window
    assert proc.terminate() == 0
    assert sorted(stored_values(db, keyfile)) == [1.0, 1.0, 2.0, 3.0, 4.0, 5.0]
