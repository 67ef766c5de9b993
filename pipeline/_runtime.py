"""The edge process: ingest -> filter chain -> store -> acknowledge, and sync beside it.

One asyncio loop.  The order of a batch's life is the no-loss rule made code:

1. take up to ``batch.max_messages`` messages (or what arrived in ``max_delay_ms``);
2. skip redeliveries whose identity is already stored; decode the rest (bad payloads
   become dead letters);
3. run the filter chain over the whole batch;
4. commit readings, dead letters, message identities and filter state in ONE transaction;
5. only then acknowledge the messages to the broker, in arrival order.

The pipeline is one batch deep: steps 4-5 of batch N run as a task while the loop takes
batch N+1 and runs steps 1-3 on it (the store seals, writes and fsyncs on its worker
thread meanwhile); N+1's commit starts once N is acknowledged.  So at most one commit is
in flight and one batch in hand.  A redelivery lookup for N+1 counts the identities of N
as stored (N+1 is only ever committed and acknowledged after N), and is answered from
the store's in-memory filter when it can be, instead of queueing behind N's commit.

While a commit waits on the disk, the loop keeps reading the socket into the next batch,
up to ``batch.max_pending`` messages; past that edgepipe stops reading and the broker
holds the rest.  A full store stops acknowledging (the broker buffers) and retries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from config._models import BatchConfig
from core._backoff import Backoff
from core._errors import EdgepipeError, StoreError, StoreFullError, SyncError
from core._metrics import METRICS
from core._model import Batch, DeadLetter

from ._parts import BatchSink, FilterChain, NoChain, Output, Parts

if TYPE_CHECKING:
    from .ingest import Message

__all__ = ["BatchSink", "FilterChain", "NoChain", "Parts", "Pipeline"]

log = logging.getLogger("edgepipe")

_batches = METRICS.counter("edgepipe_batches_total", "batches processed")
_readings_out = METRICS.counter("edgepipe_readings_out_total", "readings leaving the chain")
_acked = METRICS.counter("edgepipe_messages_acked_total", "QoS 1 messages acknowledged")
_store_full = METRICS.gauge("edgepipe_store_full", "1 while the store refuses writes")
_backlog = METRICS.gauge(
    "edgepipe_sync_backlog_readings",
    "readings stored and not yet acknowledged by the receiver (the backlog of edgepipe "
    "status and the dashboard): at start, the store's; then + stored - synced - quota drops",
)
_in_flight = METRICS.gauge(
    "edgepipe_readings_in_flight",
    "readings through the chain and not yet committed: in = dropped (but stage store) "
    "+ in_flight + stored - emitted",
)
_overlapped = METRICS.counter(
    "edgepipe_batches_overlapped_total",
    "batches decoded and run through the chain while the previous batch's commit was in flight",
)
_store_bytes = METRICS.gauge("edgepipe_store_bytes", "size of the store file")
chain_load_errors = METRICS.counter(
    "edgepipe_chain_load_errors_total", "chain files that could not be loaded at start-up"
)


#: Seconds the sync worker gets at shutdown to upload what the last batches and the
#: chain's flush stored (a receiver that is down fails at once; this bounds a slow one).
FINAL_SYNC_S = 10.0


class _BacklogGauge:
    """``edgepipe_sync_backlog_readings`` at every scrape, from the counters that change it:
    the store's unsynced readings when the pipeline started, plus readings stored, minus
    readings the receiver acknowledged, minus unsynced readings the quota dropped since.
    The same number as ``unsynced_readings`` of the store's stats at every moment."""

    def __init__(self) -> None:
        self.base: float | None = None
        METRICS.add_collector(self.collect)

    @staticmethod
    def _moved() -> float:
        return (
            METRICS.value("edgepipe_readings_stored_total")
            - METRICS.value("edgepipe_readings_synced_total")
            - METRICS.value("edgepipe_readings_dropped_total", stage="store")
        )

    def start(self, unsynced_readings: int) -> None:
        self.base = unsynced_readings - self._moved()

    def collect(self, _metrics: Any = None) -> None:
        if self.base is not None:
            _backlog.set(max(0.0, self.base + self._moved()))


BACKLOG = _BacklogGauge()


def _fault_hook() -> Any:
    from pipeline.ingest._decoder import fault_hook

    return fault_hook()


_fault_after_commit = _fault_hook() if "EDGEPIPE_FAULT" in os.environ else None


def _commit_tracer(path: str) -> Any:
    """Bench hook (EDGEPIPE_TRACE_COMMITS=FILE): one JSON line per commit with its wall time,
    message count and reading timestamps, for publish-to-commit latency in bench/e2e.py."""
    import json

    f = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def trace(n_msgs: int, batch: Batch) -> None:
        f.write(json.dumps({"t": time.time(), "msgs": n_msgs, "ts": batch.ts}) + "\n")

    return trace


_trace_commit = (
    _commit_tracer(os.environ["EDGEPIPE_TRACE_COMMITS"])
    if os.environ.get("EDGEPIPE_TRACE_COMMITS")
    else None
)


class Pipeline:
    """A running edgepipe: ``await (await build_pipeline(cfg)).run()`` (see
    ``pipeline._compose``), stopped by :meth:`stop`."""

    def __init__(
        self,
        parts: Parts,
        *,
        batch: BatchConfig,
        metrics_listen: str | None = None,
        reencrypt: bool = False,
    ) -> None:
        self.store = parts.store
        self.decoder = parts.decoder
        self.mqtt = parts.mqtt
        self.chain = parts.chain
        self.watcher = parts.watcher
        self.sync = parts.sync
        self.batch_cfg = batch
        self.metrics_listen = metrics_listen
        self.reencrypt = reencrypt
        self._stop = asyncio.Event()
        self._store_ok = True
        self._chain_ok = False
        self._tagged: tuple[Any, dict[str, bytes]] = (None, {})  # chain -> its module hashes
        self._batch_lock = asyncio.Lock()
        #: the commit (and acknowledgement) in flight, and its batch's message identities
        self._committing: tuple[asyncio.Task[None], list[bytes]] | None = None
        self.started_at = time.monotonic()
        self.first_commit_at: float | None = None

    # -- readiness (for /readyz) ------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if not self._chain_ok:
            return False, "filter chain not loaded"
        if not self._store_ok:
            return False, "store is not writable"
        if self.mqtt is None or not self.mqtt.connected:
            return False, "not connected to the MQTT broker"
        tripped = self._tripped_stages()
        if tripped:
            return False, tripped
        return True, "ready"

    def _tripped_stages(self) -> str:
        """Which stages have their circuit breaker open, and why ("" for none).  The data
        goes on (each such stage's on_error path), but the device is not doing its job."""
        chain = self.chain
        if chain is None:
            return ""
        out = [
            f"stage {d['name']}: circuit breaker {d['breaker'].replace('_', '-')} after "
            f"{d['consecutive_failures']} failures ({(d.get('last_error') or 'error')[:500]})"
            for d in chain.describe()
            if d["breaker"] != "closed"
        ]
        return "; ".join(out)

    def stop(self) -> None:
        self._stop.set()
        if self.mqtt is not None:
            self.mqtt.interrupt()

    # -- set-up -----------------------------------------------------------------------
    # Filter state is stored tagged with the sha256 of the module that wrote it, so a
    # changed module never receives a state blob it does not understand.
    def _state_tags(self, chain: FilterChain) -> dict[str, bytes]:
        if chain is not self._tagged[0]:
            self._tagged = (
                chain,
                {d["name"]: bytes.fromhex(d["sha256"]) for d in chain.describe()},
            )
        return self._tagged[1]

    def _snapshot(self, chain: FilterChain) -> dict[str, bytes]:
        states = chain.snapshot()
        if not states:
            return states
        tags = self._state_tags(chain)
        return {name: tags[name] + blob for name, blob in states.items()}

    async def _restore_states(self, chain: FilterChain) -> None:
        stored = await self.store.load_states()
        tags = self._state_tags(chain)
        usable = {}
        for name, blob in stored.items():
            tag = tags.get(name)
            if tag is not None and blob[:32] == tag:
                usable[name] = blob[32:]
            elif tag is not None:
                log.warning(
                    "stage %s: stored state was written by another module version; "
                    "starting it cold",
                    name,
                )
        chain.restore(usable)

    async def _swap_chain(self, new: FilterChain) -> None:
        """Atomically between batches: flush the old chain, commit what it emitted with the
        new chain's state, continue with the new one (previous kept for rollback)."""
        await self._committed()  # the old chain's last batch is stored first
        old = self.chain
        if old is None or isinstance(old, NoChain):
            await self._restore_states(new)
            flushed = Output(Batch(), [])
        else:
            flushed = old.hand_over(new)
        await self._commit(flushed.batch, list(flushed.dead_letters), [], self._snapshot(new))
        self.chain = new
        self._chain_ok = True
        log.info("filter chain swapped: %s", ", ".join(d["name"] for d in new.describe()))

    async def _watch_chain(self) -> None:
        """Poll the chain file between batches (the lock keeps a swap out of a batch)."""
        while True:
            await asyncio.sleep(0.25)
            new = self.watcher.poll()
            if new is not None:
                async with self._batch_lock:
                    await self._swap_chain(new)

    def _start_sync(self) -> asyncio.Task[None] | None:
        if self.sync is None:
            return None
        return asyncio.create_task(self.sync.run(self._stop), name="sync")

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> int:
        """Run until :meth:`stop`; returns the process exit code."""
        tasks: list[asyncio.Task[Any]] = []
        health = None
        collector = self.sync.logs if self.sync is not None else None
        if collector is not None:  # warnings of this run go to the cloud (docs/health.md)
            logging.getLogger().addHandler(collector)
        try:
            if self.chain is not None:
                await self._restore_states(self.chain)
                self._chain_ok = True
            await self._start_gauges()
            if self.metrics_listen:
                health = await self._start_health()
            if self.watcher is not None:
                tasks.append(asyncio.create_task(self._watch_chain(), name="chain-watch"))
            while self.chain is None and not self._stop.is_set():
                await asyncio.sleep(0.2)  # a broken chain file: wait for a fixed one
            await self.mqtt.start()
            t = self._start_sync()
            if t is not None:
                tasks.append(t)
            tasks.append(asyncio.create_task(self._gauges(), name="gauges"))
            if self.reencrypt:
                tasks.append(asyncio.create_task(self.store.reencrypt_in_background()))
            code = await self._consume()
            await self._flush_chain()
            await self._final_sync(tasks)
            return code
        finally:
            self._stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.mqtt.close()
            if self.sync is not None:
                self.sync.close()
            if self.watcher is not None:
                self.watcher.close()
            if self.chain is not None:
                self.chain.close()
            if health is not None:
                await health.close()
            if collector is not None:
                logging.getLogger().removeHandler(collector)
                await self.sync.record_now()  # type: ignore[union-attr]
            await self.store.close()
            _metrics_at_exit()

    async def _start_health(self) -> Any:
        from ._http import HealthServer

        assert self.metrics_listen is not None
        server = HealthServer(self.metrics_listen, self.ready, METRICS)
        await server.start()
        return server

    async def _consume(self) -> int:
        bc = self.batch_cfg
        mqtt = self.mqtt
        delay = bc.max_delay_ms / 1000
        try:
            while not self._stop.is_set():
                msgs = await mqtt.get_batch(bc.max_messages, delay)
                self._commit_failed()
                if not msgs:
                    continue
                async with self._batch_lock:
                    ok = await self._handle(msgs)
                if not ok:
                    await self._committed()
                    return 1
            # stopping: finish what was already taken off the socket
            mqtt.interrupt()
            while True:
                msgs = await mqtt.get_batch(bc.max_messages, 0)
                if not msgs:
                    break
                async with self._batch_lock:
                    if not await self._handle(msgs):
                        break
            await self._committed()
            return 0
        finally:
            c = self._committing
            if c is not None and not c[0].done():  # leaving on an error: nothing more is acked
                c[0].cancel()

    async def _handle(self, msgs: list[Message]) -> bool:
        """Process one batch and start its commit once the previous batch is acknowledged.
        False: the pipeline must stop."""
        decoder, chain = self.decoder, self.chain
        assert chain is not None
        dups = decoder.dup_identities(msgs)
        skip = await self._seen(dups) if dups else set()
        dec = decoder.decode(msgs, skip)
        result = chain.process(dec.batch)
        if chain.stopped:  # a chain that cannot go on at all (a stage alone never does this)
            log.error("stopping: %s (the batch was not acknowledged)", chain.stopped)
            return False
        out = result.batch
        states = self._snapshot(chain)  # the chain's state after this batch, for its commit
        # counted before the first await: a scrape never sees a reading out of the chain that
        # is neither in flight nor stored (Store.commit counts it stored before returning)
        _in_flight.inc(len(out))
        c = self._committing
        try:
            if c is not None and not c[0].done():
                _overlapped.inc()
            await self._committed()
        except BaseException:
            _in_flight.inc(-len(out))
            raise
        dead = dec.dead_letters + list(result.dead_letters)
        task = asyncio.create_task(
            self._commit_and_ack(msgs, dec.batch, out, dead, dec.keys, states)
        )
        task.add_done_callback(self._on_committed)
        self._committing = (task, dec.keys)
        return True

    async def _seen(self, dups: list[bytes]) -> set[bytes]:
        """The possible redeliveries ``dups`` that are stored, or in the commit in flight
        (it is acknowledged, and retried until stored, before this batch is committed)."""
        store, c = self.store, self._committing
        if c is None or c[0].done():
            return await store.seen(dups)
        # a lookup on the store's thread would wait for that commit: ask its filter first
        flight = set(c[1])
        hit = flight.intersection(dups)
        rest = [k for k in dups if k not in flight] if hit else dups
        maybe = store.seen_in_memory(rest)
        if maybe is None:
            maybe = set(rest)
        if maybe:
            hit |= await store.seen(list(maybe))
        return hit

    async def _committed(self) -> None:
        """Wait until the commit in flight is stored and acknowledged (its error raised)."""
        c = self._committing
        if c is None:
            return
        task = c[0]
        if not task.done():
            await asyncio.wait((task,))  # a cancelled waiter leaves the commit running
        task.result()  # a failed commit stays in place: the loop raises it too
        self._committing = None

    def _commit_failed(self) -> None:
        c = self._committing
        if c is not None and c[0].done() and not c[0].cancelled() and c[0].exception():
            c[0].result()

    def _on_committed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.mqtt.interrupt()  # wake the loop from get_batch to raise it

    async def _commit_and_ack(
        self,
        msgs: list[Message],
        decoded: Batch,
        batch: Batch,
        dead: list[DeadLetter],
        keys: list[bytes],
        states: dict[str, bytes],
    ) -> None:
        """Commit one batch (counted in flight by the caller), then acknowledge it."""
        try:
            await self._commit_retrying(batch, dead, keys, states)
        finally:
            _in_flight.inc(-len(batch))
        if _trace_commit is not None:
            _trace_commit(len(msgs), decoded)
        if _fault_after_commit is not None:  # test hook, see pipeline.ingest._decoder.fault_hook
            slow = _fault_after_commit()
            if slow is not None:
                await slow
        n = self.mqtt.ack(msgs)
        _acked.inc(n)
        _batches.inc()
        _readings_out.inc(len(batch))
        if self.sync is not None:
            self.sync.notify()

    async def _commit(
        self, batch: Batch, dead: list[DeadLetter], keys: list[bytes], states: dict[str, bytes]
    ) -> None:
        # counted before the first await: a scrape never sees a reading out of the chain that
        # is neither in flight nor stored (Store.commit counts it stored before returning)
        _in_flight.inc(len(batch))
        try:
            await self._commit_retrying(batch, dead, keys, states)
        finally:
            _in_flight.inc(-len(batch))

    async def _commit_retrying(
        self, batch: Batch, dead: list[DeadLetter], keys: list[bytes], states: dict[str, bytes]
    ) -> None:
        backoff = Backoff(0.5, 10.0, jitter=False)
        while True:
            try:
                await self.store.commit(batch, dead, keys, states)
                if self.first_commit_at is None:
                    self.first_commit_at = time.monotonic()
                if not self._store_ok:
                    log.warning("store is writable again; resuming")
                    _store_full.set(0)
                self._store_ok = True
                return
            except (StoreFullError, StoreError) as e:
                if self._store_ok:
                    log.error(
                        "ALARM: cannot commit (%s); not acknowledging, the broker "
                        "buffers until space returns",
                        e,
                    )
                self._store_ok = False
                _store_full.set(1)
                # keep the batch in hand; the socket reader pauses once max_pending is hit
                await asyncio.sleep(backoff.next())

    async def _flush_chain(self) -> None:
        if self.chain is None:
            return
        try:
            result = self.chain.flush()
        except EdgepipeError as e:
            log.error("flushing the chain failed: %s", e)
            return
        if len(result.batch) or result.dead_letters:
            _in_flight.inc(len(result.batch))
            try:
                # once: at shutdown a full store must not hold the process forever
                await self.store.commit(
                    result.batch, list(result.dead_letters), (), self._snapshot(self.chain)
                )
            except (StoreFullError, StoreError) as e:
                log.error("the chain's flush at shutdown could not be stored: %s", e)
            finally:
                _in_flight.inc(-len(result.batch))
            if self.sync is not None:
                self.sync.notify()

    async def _final_sync(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Let the sync worker upload what was stored last (the chain's flush included),
        within :data:`FINAL_SYNC_S`; what it cannot send waits in the store for next time."""
        if self.sync is None:
            return
        self._stop.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FINAL_SYNC_S
        running = [t for t in tasks if t.get_name() == "sync" and not t.done()]
        if running:  # the background loop ends its request in hand, then sees the stop
            await asyncio.wait(running, timeout=FINAL_SYNC_S)
            for t in running:
                t.cancel()
        try:
            left = max(0.0, deadline - loop.time())
            n = await asyncio.wait_for(self.sync.drain(), timeout=left)
        except (SyncError, TimeoutError) as e:
            why = str(e) or f"not done within {FINAL_SYNC_S:g} s"
            log.warning("at shutdown: could not sync the backlog (%s)", why)
        else:
            if n:
                log.info("at shutdown: synced %d readings", n)
        BACKLOG.collect()
        backlog = METRICS.value("edgepipe_sync_backlog_readings")
        if backlog:
            log.warning(
                "at shutdown: %d readings are not synced yet; they upload next time", backlog
            )

    async def _start_gauges(self) -> None:
        s = await self.store.stats()
        BACKLOG.start(s["unsynced_readings"])
        _store_bytes.set(s["db_bytes"])

    async def _gauges(self) -> None:
        while True:
            await asyncio.sleep(5)
            try:
                s = await self.store.stats()
                _store_bytes.set(s["db_bytes"])
            except EdgepipeError:
                pass


def _metrics_at_exit() -> None:
    """With ``EDGEPIPE_METRICS_AT_EXIT=FILE``, the final ``/metrics`` text is written there
    (atomically) once everything is stored, synced and closed: the counters of the whole run,
    the shutdown flush and the last uploads included, in the Prometheus text format (what
    node_exporter's textfile collector reads).  ``edgepipe demo`` totals its devices' runs
    from these."""
    path = os.environ.get("EDGEPIPE_METRICS_AT_EXIT")
    if not path:
        return
    from pathlib import Path

    from core._fsutil import atomic_write

    BACKLOG.collect()
    try:
        atomic_write(Path(path), METRICS.render().encode())
    except OSError as e:
        log.error("could not write the final metrics to %s: %s", path, e)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
