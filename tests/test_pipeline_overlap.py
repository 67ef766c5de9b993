"""The runtime is one batch deep: batch N+1 is taken, looked up, decoded and run through the
chain while batch N is being committed; each batch is acknowledged after its own commit.

Real mosquitto, real SQLite, real ``edgepipe run`` processes (and, for the redelivery that
arrives while its first copy is still being committed, the real pipeline in this process
with its store's commits held at a gate the test opens).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from config._loader import load_config
from core._metrics import METRICS
from pipeline._compose import build_pipeline
from tests.helpers.mqtt import Publisher, config, drain, publish_now, seq_message, started
from tests.helpers.store import assert_exactly, stored_values


def test_the_next_batch_is_decoded_while_a_commit_is_in_flight(
    tmp_path, broker, keyfile, edge, monkeypatch
):
    n = 1000
    cfg = config(
        tmp_path,
        broker,
        keyfile,
        broker={"client_id": "edgepipe-overlap"},
        batch={"max_messages": 100, "max_delay_ms": 5},
    )
    db = tmp_path / "store.db"
    monkeypatch.setenv("EDGEPIPE_FAULT", "slow_commit:50")  # each commit holds its ack
    proc = started(edge, cfg)
    monkeypatch.delenv("EDGEPIPE_FAULT")
    pub = Publisher(broker, [seq_message(i) for i in range(n)], rate=20000)
    pub.start()
    pub.join_ok()
    proc.wait_metric("edgepipe_messages_acked_total", n, 60)
    assert proc.metric("edgepipe_batches_overlapped_total") >= 1
    assert proc.metric("edgepipe_readings_in_flight") == 0
    drain(broker, proc, n)
    assert proc.terminate() == 0
    assert_exactly(stored_values(db, keyfile), n + 1)


def test_kill9_with_a_commit_in_flight_and_the_next_batch_in_hand(
    tmp_path, broker, keyfile, edge, monkeypatch
):
    """Batch 1 committed and its acknowledgement held, batch 2 decoded behind it: neither
    is acknowledged, and after kill -9 both come back and are stored once."""
    n = 300
    kw = {
        "broker": {"client_id": "edgepipe-overlap-kill"},
        "batch": {"max_messages": 100, "max_delay_ms": 5},
    }
    db = tmp_path / "store.db"
    monkeypatch.setenv("EDGEPIPE_FAULT", "slow_commit:600000")  # the first ack never comes
    proc = started(edge, config(tmp_path, broker, keyfile, **kw))
    monkeypatch.delenv("EDGEPIPE_FAULT")
    publish_now(broker, [seq_message(i) for i in range(n)])
    proc.wait_metric("edgepipe_batches_overlapped_total", 1, 30)
    proc.wait_metric("edgepipe_store_batches_total", 1, 30)
    assert proc.metric("edgepipe_messages_acked_total") == 0
    assert proc.metric("edgepipe_readings_in_flight") > 0  # the batch in hand
    first = stored_values(db, keyfile)
    assert 0 < len(first) < n
    proc.kill9()
    proc = started(edge, config(tmp_path, broker, keyfile, **kw))
    drain(broker, proc, n)
    assert proc.metric("edgepipe_redeliveries_skipped_total") >= len(first)
    assert proc.terminate() == 0
    assert_exactly(stored_values(db, keyfile), n + 1)


class _HeldStore:
    """The real store, its commits held before they reach SQLite until ``gate`` is set."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def commit(self, *args: Any, **kw: Any) -> Any:
        self.entered.set()
        await self.gate.wait()
        return await self._store.commit(*args, **kw)


async def _until(pred: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # polling interval, not synchronisation


def _value(name: str) -> float:
    return METRICS.value(name)


def test_a_redelivery_whose_first_copy_is_still_committing_is_stored_once(
    tmp_path, broker, keyfile
):
    cfg = config(
        tmp_path,
        broker,
        keyfile,
        broker={"client_id": "edgepipe-overlap-dup", "redelivery_window_s": 3600},
        batch={"max_messages": 100, "max_delay_ms": 5},
        metrics={"listen": None},
    )
    same = seq_message(1)

    async def scenario() -> int:
        p = await build_pipeline(load_config(cfg))
        held = p.store = _HeldStore(p.store)
        run = asyncio.create_task(p.run())
        try:
            await asyncio.wait_for(p.mqtt.wait_subscribed(), 30)
            acked, skipped = (
                _value("edgepipe_messages_acked_total"),
                _value("edgepipe_redeliveries_skipped_total"),
            )
            await asyncio.to_thread(publish_now, broker, [same])
            await asyncio.wait_for(held.entered.wait(), 30)  # batch 1 committing, not stored
            # the copy arrives in the redelivery window, as after a reconnect
            await asyncio.to_thread(publish_now, broker, [same, seq_message(2)])
            await _until(
                lambda: _value("edgepipe_redeliveries_skipped_total") > skipped,
                "the copy recognised while its first delivery is being committed",
            )
            assert _value("edgepipe_messages_acked_total") == acked  # nothing before its commit
            held.gate.set()
            await _until(
                lambda: _value("edgepipe_messages_acked_total") >= acked + 3, "all acknowledged"
            )
        finally:
            held.gate.set()
            p.stop()
        return await run

    assert asyncio.run(scenario()) == 0
    assert sorted(stored_values(tmp_path / "store.db", keyfile)) == [1.0, 2.0]
