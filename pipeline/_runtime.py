"""The edge process: ingest -> filter chain -> store -> acknowledge, and sync beside it.

One asyncio loop.  The order of a batch's life is the no-loss rule made code:

1. take up to ``batch.max_messages`` messages (or what arrived in ``max_delay_ms``);
2. skip redeliveries whose identity is already stored; decode the rest (bad payloads
   become dead letters);
3. run the filter chain over the whole batch;
4. commit readings, dead letters, message identities and filter state in ONE transaction;
5. only then acknowledge the messages to the broker, in arrival order.

While step 4 waits on the disk, the loop keeps reading the socket into the next batch,
up to ``batch.max_pending`` messages; past that edgepipe stops reading and the broker
holds the rest.  A full store stops acknowledging (the broker buffers) and retries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from config._models import PipelineConfig
from core._backoff import Backoff
from core._errors import ConfigError, EdgepipeError, FilterError, StoreError, StoreFullError
from core._metrics import METRICS
from core._model import Batch, DeadLetter

__all__ = ["Pipeline"]

log = logging.getLogger("edgepipe")

_batches = METRICS.counter("edgepipe_batches_total", "batches processed")
_readings_out = METRICS.counter("edgepipe_readings_out_total", "readings leaving the chain")
_acked = METRICS.counter("edgepipe_messages_acked_total", "QoS 1 messages acknowledged")
_store_full = METRICS.gauge("edgepipe_store_full", "1 while the store refuses writes")
_backlog = METRICS.gauge("edgepipe_sync_backlog_readings", "readings not yet synced")
_store_bytes = METRICS.gauge("edgepipe_store_bytes", "size of the store file")
_chain_errors = METRICS.counter(
    "edgepipe_chain_load_errors_total", "chain files that could not be loaded at start-up"
)


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


class _NoChain:
    """The chain when none is configured: readings pass through unchanged."""

    stopped = None

    def process(self, batch: Batch) -> Any:
        return _Result(batch, [])

    def flush(self) -> Any:
        return _Result(Batch(), [])

    def snapshot(self) -> dict[str, bytes]:
        return {}

    def restore(self, states: dict[str, bytes]) -> None:
        pass

    def describe(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        pass


class _Result:
    __slots__ = ("batch", "dead_letters")

    def __init__(self, batch: Batch, dead_letters: list[DeadLetter]) -> None:
        self.batch, self.dead_letters = batch, dead_letters


class Pipeline:
    """A running edgepipe: ``await Pipeline(cfg).run(stop_event)``."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.store: Any = None
        self.chain: Any = None
        self.mqtt: Any = None
        self.sync: Any = None
        self.decoder: Any = None
        self._stop = asyncio.Event()
        self._store_ok = True
        self._chain_ok = False
        self.watcher: Any = None
        self._tagged: tuple[Any, dict[str, bytes]] = (None, {})  # chain -> its module hashes
        self._batch_lock = asyncio.Lock()
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
        return True, "ready"

    def stop(self) -> None:
        self._stop.set()
        if self.mqtt is not None:
            self.mqtt.interrupt()

    # -- set-up -----------------------------------------------------------------------
    async def _open(self) -> None:
        from pipeline.ingest._decoder import Decoder
        from pipeline.ingest._mqtt import MQTTClient
        from storage import Keyring, Store

        cfg = self.cfg
        if cfg.store.key is None:
            raise ConfigError("store.key is required (a keyring file, env var or secret)")
        keyring = Keyring.from_secret(cfg.store.key)
        self.store = await Store.open(
            cfg.resolve(cfg.store.path),
            keyring,
            device_id=cfg.device.id,
            quota_bytes=int(cfg.store.quota_mb * 1024 * 1024),
            on_full=cfg.store.on_full,
            synchronous=cfg.store.synchronous,
        )
        self.chain = self._build_chain()
        if self.chain is not None:
            await self._restore_states(self.chain)
            self._chain_ok = True
        self.decoder = Decoder(
            cfg.subscriptions,
            self.store.registry,
            device_id=cfg.device.id,
            max_payload=cfg.batch.max_payload_bytes,
            identity_key=self.store.identity_key,
        )
        self.mqtt = MQTTClient(
            cfg.broker,
            self.decoder.topic_filters,
            device_id=cfg.device.id,
            max_pending=cfg.batch.max_pending,
            expect_session=self.store.last_seq > 0,
        )

    def _build_chain(self) -> Any:
        """The chain from ``chain:`` or ``chain_file:``; None while a chain file is broken.

        With a chain file, a watcher hot-swaps the chain when the file changes (``edgepipe
        deploy``, a ConfigMap update).  A chain file that can't be loaded at start-up leaves
        the process running but not ready and not consuming (the broker holds the messages)
        until a fixed file appears."""
        cfg = self.cfg
        if cfg.chain_file is None and not cfg.chain:
            return _NoChain()
        from pipeline.chain._chain import Chain
        from pipeline.chain._deploy import ChainSpec, ChainWatcher, default_cache_dir, load_chain

        cache = default_cache_dir(cfg)
        chain = None
        try:
            spec = load_chain(cfg)
            chain = Chain.build(
                spec.stages, self.store.registry, base_dir=spec.base_dir, cache_dir=cache
            )
        except (ConfigError, FilterError) as e:
            if cfg.chain_file is None:
                raise
            log.error(
                "the filter chain cannot be loaded, waiting for a fixed chain file "
                "(not consuming meanwhile): %s",
                e,
            )
            _chain_errors.inc()
            spec = ChainSpec([], cfg.base_dir, cfg.resolve(cfg.chain_file), None)
        if spec.path is not None:
            self.watcher = ChainWatcher(spec, self.store.registry, cache_dir=cache)
        return chain

    # Filter state is stored tagged with the sha256 of the module that wrote it, so a
    # changed module never receives a state blob it does not understand.
    def _state_tags(self, chain: Any) -> dict[str, bytes]:
        if chain is not self._tagged[0]:
            self._tagged = (
                chain,
                {d["name"]: bytes.fromhex(d["sha256"]) for d in chain.describe()},
            )
        return self._tagged[1]

    def _snapshot(self, chain: Any) -> dict[str, bytes]:
        states = chain.snapshot()
        if not states:
            return states
        tags = self._state_tags(chain)
        return {name: tags[name] + blob for name, blob in states.items()}

    async def _restore_states(self, chain: Any) -> None:
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

    async def _swap_chain(self, new: Any) -> None:
        """Atomically between batches: flush the old chain, commit what it emitted with the
        new chain's state, continue with the new one (previous kept for rollback)."""
        old = self.chain
        if old is None or isinstance(old, _NoChain):
            await self._restore_states(new)
            flushed = _Result(Batch(), [])
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
        cfg = self.cfg.sync
        if not cfg.enabled:
            return None
        from sync import SyncWorker

        secret = cfg.device_secret.get() if cfg.device_secret is not None else None
        self.sync = SyncWorker(
            self.store, cfg, device_id=self.cfg.device.id, secret=secret, base_dir=self.cfg.base_dir
        )
        return asyncio.create_task(self.sync.run(self._stop), name="sync")

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> int:
        """Run until :meth:`stop`; returns the process exit code."""
        tasks: list[asyncio.Task[Any]] = []
        health = None
        try:
            await self._open()
            if self.cfg.metrics.listen:
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
            if self.cfg.store.reencrypt:
                tasks.append(asyncio.create_task(self.store.reencrypt_in_background()))
            code = await self._consume()
            await self._flush_chain()
            return code
        finally:
            self._stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.mqtt is not None:
                await self.mqtt.close()
            if self.sync is not None:
                self.sync.close()
            if self.watcher is not None:
                self.watcher.close()
            if self.chain is not None:
                self.chain.close()
            if health is not None:
                await health.close()
            if self.store is not None:
                await self.store.close()

    async def _start_health(self) -> Any:
        from ._http import HealthServer

        server = HealthServer(self.cfg.metrics.listen, self.ready, METRICS)
        await server.start()
        return server

    async def _consume(self) -> int:
        bc = self.cfg.batch
        mqtt = self.mqtt
        delay = bc.max_delay_ms / 1000
        while not self._stop.is_set():
            msgs = await mqtt.get_batch(bc.max_messages, delay)
            if not msgs:
                continue
            async with self._batch_lock:
                ok = await self._handle(msgs)
            if not ok:
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
        return 0

    async def _handle(self, msgs: list[Any]) -> bool:
        """Process, commit, acknowledge one batch.  False: the pipeline must stop."""
        decoder, store, chain = self.decoder, self.store, self.chain
        dups = decoder.dup_identities(msgs)
        skip = await store.seen(dups) if dups else set()
        dec = decoder.decode(msgs, skip)
        result = chain.process(dec.batch)
        if chain.stopped:
            log.error("stopping: %s (the batch was not acknowledged)", chain.stopped)
            return False
        dead = dec.dead_letters + list(result.dead_letters)
        await self._commit(result.batch, dead, dec.keys, self._snapshot(chain))
        if _trace_commit is not None:
            _trace_commit(len(msgs), dec.batch)
        if _fault_after_commit is not None:  # test hook, see pipeline.ingest._decoder.fault_hook
            slow = _fault_after_commit()
            if slow is not None:
                await slow
        n = self.mqtt.ack(msgs)
        _acked.inc(n)
        _batches.inc()
        _readings_out.inc(len(result.batch))
        if self.sync is not None:
            self.sync.notify()
        return True

    async def _commit(
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
            await self.store.commit(
                result.batch, list(result.dead_letters), (), self._snapshot(self.chain)
            )

    async def _gauges(self) -> None:
        while True:
            try:
                s = await self.store.stats()
                _backlog.set(s["unsynced_readings"])
                _store_bytes.set(s["db_bytes"])
            except EdgepipeError:
                pass
            await asyncio.sleep(5)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
