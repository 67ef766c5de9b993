"""The sync worker: uploads committed batches to the cloud receiver.

Several batches go in one request (msgpack, compressed), signed with the device secret (see
docs/sync.md).  A batch is marked synced only when the receiver lists its sequence number as
durably acknowledged; the receiver is idempotent on (device, seq), so a retry after a lost
response never duplicates readings.  The backlog is read page by page (never whole), so
memory stays flat however long the device was offline.

Connectivity: the link in use comes from sysfs (:mod:`sync._link`), polled every
``sync.links.poll_s`` while waiting, so a link coming back ends any backoff at once.  While
the receiver is unreachable the worker backs off exponentially with full jitter, honours
``Retry-After``, and probes ``GET /v1/ping`` before sending a body again.

Metered links (cellular): a daily byte budget, and only the classes in
``sync.metered.priority`` are sent, in that order (alerts = batches with a flagged reading,
recent = newer than ``recent_hours``, bulk = the rest).  Within a class, batches go in seq
order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from config._models import SyncConfig
from core._backoff import Backoff
from core._clock import SYSTEM_CLOCK, Clock, utc_day
from core._errors import SyncError
from core._metrics import METRICS
from core._model import DeadLetter, SeriesRegistry

from ._bundles import BundleAgent
from ._health import HealthSampler, encode_health
from ._link import Link, LinkMonitor
from ._logs import LogCollector
from ._request import (
    DEAD_LETTERS_PER_REQUEST,
    dead_letter_meta,
    encode_batch,
    encode_request,
    encode_within,
    select_metered,
)
from ._state import SyncState
from ._transport import Transport

# encode_batch and encode_request live in ._request (importable from here as before)
__all__ = ["BatchSource", "SyncWorker", "encode_batch", "encode_request"]

log = logging.getLogger("edgepipe.sync")

_bytes_sent = METRICS.counter("edgepipe_sync_bytes_total", "bytes uploaded", ["link"])
_batches_synced = METRICS.counter("edgepipe_sync_batches_total", "batches acknowledged by cloud")
_readings_synced = METRICS.counter("edgepipe_readings_synced_total", "readings acknowledged")
_sync_errors = METRICS.counter("edgepipe_sync_errors_total", "failed uploads", ["kind"])
_waits = METRICS.counter(
    "edgepipe_sync_waits_total",
    "times the sync worker decided not to send yet, by reason (no_link, budget, unmetered: "
    "classes kept for an unmetered link, backoff, retry_after: the receiver asked to wait)",
    ["reason"],
)
_probes = METRICS.counter(
    "edgepipe_sync_probes_total",
    "GET /v1/ping probes of the receiver before a body is sent again, by result (ok, failed)",
    ["result"],
)
_records_sent = METRICS.counter(
    "edgepipe_sync_device_records_total",
    "health snapshots and log records acknowledged by the receiver, by kind (health, logs)",
    ["kind"],
)
_link_polls = METRICS.counter(
    "edgepipe_sync_link_polls_total", "reads of the link state (sysfs) while the sync worker waits"
)


class BatchSource(Protocol):
    """What the worker needs of the store: the unsynced backlog, page by page, and a way to
    mark what the receiver acknowledged (``storage.Store`` is one)."""

    path: Path
    registry: SeriesRegistry

    async def unsynced(self, after: int = 0, limit: int = 16) -> list[Any]: ...

    async def mark_synced(self, seqs: Iterable[int]) -> None: ...

    async def unsynced_dead_letters(self, limit: int = 200) -> list[tuple[int, DeadLetter]]: ...

    async def mark_dead_letters_synced(self, seqs: Iterable[int]) -> None: ...

    async def stats(self) -> dict[str, Any]: ...


class SyncWorker:
    """``await worker.run(stop_event)`` keeps the store drained to the receiver until stopped;
    ``await worker.drain()`` uploads until the backlog is empty (``edgepipe sync --now``)."""

    def __init__(
        self,
        store: BatchSource,
        cfg: SyncConfig,
        *,
        transport: Transport,
        links: LinkMonitor,
        state_path: Path,
        link: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        health: HealthSampler | None = None,
        logs: LogCollector | None = None,
        health_every_s: float = 60.0,
    ) -> None:
        """Built by the composition root (``pipeline._compose.sync_worker``), which resolves
        paths and makes the transport and link monitor from the config.  With ``health``
        and ``logs`` (then ``store`` must be a ``storage.Store``), a health snapshot is
        stored every ``health_every_s`` seconds and the collected warnings with it; both
        are uploaded with the batches (docs/health.md)."""
        self.store = store
        self.cfg = cfg
        self.device_id = transport.device_id
        self.transport = transport
        self.links = links
        self._fixed_link = link  # tests/tools may pin the link kind
        self._clock = clock
        self.state_path = Path(state_path)
        self.status = SyncState.load(self.state_path)
        self._wake = asyncio.Event()
        self._backoff = Backoff(cfg.backoff_min_s, cfg.backoff_max_s)
        self._probe_first = False
        self._max_batches = cfg.batches_per_request
        self._cursors: dict[str, int] = {}
        self._cursor_link: tuple[str, str | None] | None = None
        self.health = health
        self.logs = logs
        self.health_every_s = health_every_s
        #: the receiver's clock minus ours (ms), from the last upload's exchange
        self.clock_skew_ms: int | None = None
        #: signed chain bundles (docs/rollout.md); set by the composition root
        self.bundles: BundleAgent | None = None

    def _now_ms(self) -> int:
        return int(self._clock.time() * 1000)

    def _today(self) -> str:
        """The UTC day by this worker's clock: the day the byte budget counts."""
        return utc_day(self._now_ms())

    # -- public -------------------------------------------------------------------------
    def notify(self) -> None:
        """Called after each commit: there is something new to upload."""
        self._wake.set()

    def link(self) -> Link:
        link = self.links.current()
        if self._fixed_link is not None and link.up:
            return Link(
                self._fixed_link, link.interface, True, self._fixed_link in self.links.metered
            )
        return link

    async def run(self, stop: asyncio.Event) -> None:
        """The background loop of ``edgepipe run``.  Never raises (but on cancellation)."""
        sampler = None
        if self.health is not None or self.logs is not None:
            sampler = asyncio.create_task(self._record_loop(stop), name="health")
        try:
            await self._run(stop)
        finally:
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
                await self.record_now()  # the last warnings of this run are kept

    async def _record_loop(self, stop: asyncio.Event) -> None:
        """A health snapshot (and the warnings collected) into the store every
        ``health_every_s``, link or no link: a gap while offline fills in later."""
        while not stop.is_set():
            await self.record_now()
            if self.health is not None:
                self.notify()
            await _wait(stop, self.health_every_s)

    async def record_now(self) -> None:
        """Store one health snapshot and the collected log records now.  Never raises."""
        store: Any = self.store
        try:
            if self.health is not None:
                stats = await store.stats()
                self.status.roll_day(self._today())
                snap = self.health.sample(self._now_ms(), stats, dict(self.status.bytes_today))
                if self.clock_skew_ms is not None:
                    snap["clock_skew_ms"] = self.clock_skew_ms
                await store.append_records("health", [snap])
            if self.logs is not None:
                records = self.logs.drain()
                if records:
                    await store.append_records("logs", records)
        except Exception as e:  # the store is full or closing: the next round tries again
            log.debug("health/log records not stored: %s", e)

    async def _run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._step(stop)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not end syncing for the life of the process
                log.exception("sync step failed unexpectedly")
                self._record_error(SyncError(f"internal error: {type(e).__name__}: {e}"))
                await self._sleep(stop, self._backoff.next(), on_data=False)

    async def _step(self, stop: asyncio.Event) -> None:
        link = self.link()
        if not link.up:
            self._set_waiting(
                f"no network link is up ({self.links.describe_down()})", link, "no_link"
            )
            await self._sleep(stop, 3600, on_data=False)
            return
        if self.bundles is not None and self.bundles.due():
            await self.check_bundle(link)
        try:
            sent = await self.sync_once(link)
        except SyncError as e:
            self._record_error(e)
            wait = self._retry_wait(e)
            log.warning("sync failed: %s; next try in %.1fs", e, wait)
            if await self._sleep(stop, wait, on_data=False) == "link":
                self._backoff.reset()
            return
        self._backoff.reset()
        if sent == 0:
            self._wake.clear()
            await self._sleep(stop, self.cfg.interval_s, on_data=True)

    async def drain(
        self,
        progress: Callable[[int], None] | None = None,
        *,
        retry_for: float | None = None,
    ) -> int:
        """Upload until nothing more can be sent; returns readings acknowledged.

        Raises SyncError at the first failure, or, with ``retry_for`` seconds, keeps
        retrying (backoff, link watching) until that much time has passed without success.
        """
        total = 0
        stop = asyncio.Event()
        deadline = None if retry_for is None else time.monotonic() + retry_for
        while True:
            link = self.link()
            try:
                if not link.up:
                    self._set_waiting(
                        f"no network link is up ({self.links.describe_down()})", link, "no_link"
                    )
                    raise SyncError(f"no network link is up ({self.links.describe_down()})")
                n = await self.sync_once(link)
            except SyncError as e:
                self._record_error(e)
                if deadline is None or time.monotonic() >= deadline:
                    raise
                wait = min(self._retry_wait(e), max(0.0, deadline - time.monotonic()))
                if await self._sleep(stop, wait, on_data=False) == "link":
                    self._backoff.reset()
                continue
            self._backoff.reset()
            if deadline is not None:
                deadline = time.monotonic() + retry_for  # type: ignore[operator]
            if n == 0:
                return total
            total += n
            if progress is not None:
                progress(total)

    async def sync_once(self, link: Link | None = None) -> int:
        """One request with up to ``batches_per_request`` batches; returns readings acked
        (0: nothing to send now -- see ``status.waiting``)."""
        link = link or self.link()
        self._reset_cursors_on_change(link)
        budget_left = self._budget_left(link)
        if budget_left is not None and budget_left <= 0:
            self._set_waiting(f"daily budget of the {link.kind} link is used up", link, "budget")
            return 0
        batches, advance, waiting = await self._select(link)
        dead = await self.store.unsynced_dead_letters(limit=DEAD_LETTERS_PER_REQUEST)
        health, logs = await self._unsynced_records(link)
        if not batches and not dead and not health and not logs:
            self._set_waiting(waiting, link, "unmetered")
            return 0
        stats = await self.store.stats()
        # the backlog as it will be once this request is acknowledged
        left_batches = max(0, stats["unsynced_batches"] - len(batches))
        status = {
            "backlog_batches": left_batches,
            "backlog_readings": max(
                0, stats["unsynced_readings"] - sum(len(sb.batch) for sb in batches)
            ),
            "oldest_unsynced_ms": stats["oldest_unsynced_ms"] if left_batches else None,
            "dead_letters": stats["dead_letters"],
            "link": link.kind,
        }
        dead_meta = [dead_letter_meta(seq, d) for seq, d in dead]
        extras = {
            "health": encode_health(health) if health else None,
            "logs": [{"seq": seq, **rec} for seq, rec in logs],
        }
        body, encoding, batches = await asyncio.to_thread(
            encode_within,
            self.device_id,
            self.store.registry,
            self.cfg,
            batches,
            status,
            budget_left,
            dead_meta,
            extras,
        )
        if not body and (health or logs) and batches:  # the budget: readings come first
            health, logs = [], []
            body, encoding, batches = await asyncio.to_thread(
                encode_within,
                self.device_id,
                self.store.registry,
                self.cfg,
                batches,
                status,
                budget_left,
                dead_meta,
            )
        if not body:
            self._set_waiting(f"daily budget of the {link.kind} link is used up", link, "budget")
            return 0
        if self._probe_first:
            try:
                await asyncio.to_thread(self.transport.ping)
            except SyncError:
                _probes.inc(1, "failed")
                raise
            _probes.inc(1, "ok")
            self._probe_first = False
        self.status.last_attempt_ms = self._now_ms()
        sent_at = self._clock.time()
        try:
            result = await asyncio.to_thread(self.transport.post_batches, body, encoding, link.kind)
        except SyncError as e:
            if e.status is None:
                self._probe_first = True
                _sync_errors.inc(1, "network")
            else:
                _sync_errors.inc(1, str(e.status))
            if e.status == 413 and self._max_batches > 1:
                self._max_batches = max(1, len(batches) // 2)
            # bytes were (probably) on the wire all the same: count them against the budget
            self._count_bytes(link, len(body))
            raise
        # a 200 means the whole request was committed, dead letters included
        await self.store.mark_dead_letters_synced(seq for seq, _ in dead)
        await self._records_synced(health, logs, result, sent_at)
        acked = set()
        for s in result.get("acked", ()):
            if isinstance(s, int):
                acked.add(s)
        ok = [sb for sb in batches if sb.seq in acked]
        await self.store.mark_synced(sb.seq for sb in ok)
        n = sum(len(sb.batch) for sb in ok)
        _batches_synced.inc(len(ok))
        _readings_synced.inc(n)
        self._count_bytes(link, len(body))
        if not batches:
            return 0  # dead letters or device records only
        if not ok:
            raise SyncError("the receiver acknowledged none of the batches sent", status=200)
        if len(ok) == len(batches):
            for cls, seq in advance.items():
                self._cursors[cls] = max(self._cursors.get(cls, 0), seq)
        self._record_success(link, n, stats, [sb.seq for sb in ok])
        return n

    async def check_bundle(self, link: Link | None = None) -> None:
        """Ask for the desired bundle and apply it if it is new and valid; never raises (a
        failed check-in is logged and tried again at the next ``check_every_s``)."""
        if self.bundles is None:
            return
        link = link or self.link()
        try:
            n = await self.bundles.check(link, self._budget_left(link))
        except SyncError as e:
            log.warning("bundle check-in failed: %s", e)
            return
        self._count_bytes(link, n)

    def close(self) -> None:
        self.transport.close()

    # -- health and log records -----------------------------------------------------------
    #: records per request: unmetered, metered (there, only the newest snapshots' worth)
    _RECORDS = {False: (120, 200), True: (4, 20)}

    async def _unsynced_records(self, link: Link) -> tuple[list[Any], list[Any]]:
        if self.health is None and self.logs is None:
            return [], []
        store: Any = self.store
        n_health, n_logs = self._RECORDS[bool(link.metered)]
        return (
            await store.unsynced_records("health", n_health),
            await store.unsynced_records("logs", n_logs),
        )

    async def _records_synced(
        self, health: list[Any], logs: list[Any], result: dict[str, Any], sent_at: float
    ) -> None:
        store: Any = self.store
        if health:
            await store.mark_records_synced("health", [seq for seq, _ in health])
            _records_sent.inc(len(health), "health")
        if logs:
            await store.mark_records_synced("logs", [seq for seq, _ in logs])
            _records_sent.inc(len(logs), "logs")
        theirs = result.get("time_ms")
        if isinstance(theirs, int) and not isinstance(theirs, bool):
            mid = (sent_at + self._clock.time()) / 2
            self.clock_skew_ms = int(theirs - mid * 1000)

    # -- choosing what to send --------------------------------------------------------------
    async def _select(self, link: Link) -> tuple[list[Any], dict[str, int], str | None]:
        if not link.metered:
            return await self.store.unsynced(limit=self._max_batches), {}, None
        recent_after = self._now_ms() - int(self.cfg.metered.recent_hours * 3600_000)
        return await select_metered(
            self.store, self.cfg.metered.priority, self._max_batches, self._cursors, recent_after
        )

    def _reset_cursors_on_change(self, link: Link) -> None:
        key = (link.kind, link.interface)
        if key != self._cursor_link:
            self._cursor_link, self._cursors = key, {}

    def _budget_left(self, link: Link) -> int | None:
        mb = self.cfg.metered.daily_budget_mb
        if not link.metered or mb is None:
            return None
        return int(mb * 1024 * 1024) - self.status.used_today(link.kind, self._today())

    # -- waiting ----------------------------------------------------------------------------
    async def _sleep(self, stop: asyncio.Event, timeout: float, *, on_data: bool) -> str:
        """Wait ``timeout`` s by the worker's clock; return early ("link") when a link comes
        up or changes, or
        ("data") on :meth:`notify` if ``on_data``.  Reads sysfs every ``poll_s``."""
        deadline = self._clock.monotonic() + timeout
        first = self.links.current()
        while not stop.is_set():
            left = deadline - self._clock.monotonic()
            if left <= 0:
                return "timeout"
            await _wait(stop, min(left, self.links.poll_s), self._wake if on_data else None)
            if on_data and self._wake.is_set():
                return "data"
            now = self.links.current()
            _link_polls.inc()
            if now != first:
                if now.up:
                    log.info("link %s is up", now.describe())
                    self._probe_first = True
                    return "link"
                first = now
        return "stop"

    # -- status -----------------------------------------------------------------------------
    def _count_bytes(self, link: Link, n: int) -> None:
        self.status.add_bytes(link.kind, n, self._today())
        _bytes_sent.inc(n, link.kind)

    def _record_success(self, link: Link, n: int, stats: dict[str, Any], seqs: list[int]) -> None:
        st = self.status
        st.last_success_ms = self._now_ms()
        st.online, st.waiting = True, None
        st.link, st.interface = link.kind, link.interface
        st.readings_sent_total += n
        st.backlog_batches = max(0, stats["unsynced_batches"] - len(seqs))
        st.backlog_readings = max(0, stats["unsynced_readings"] - n)
        st.oldest_unsynced_ms = stats["oldest_unsynced_ms"]
        st.save(self.state_path)

    def _record_error(self, e: SyncError) -> None:
        st = self.status
        st.last_error = str(e)
        st.last_error_ms = self._now_ms()
        st.online = e.status is not None
        st.save(self.state_path)

    def _retry_wait(self, e: SyncError) -> float:
        """Seconds to wait after a failed attempt: the receiver's Retry-After, else backoff."""
        if e.retry_after is not None:
            _waits.inc(1, "retry_after")
            return e.retry_after
        _waits.inc(1, "backoff")
        return self._backoff.next()

    def _set_waiting(self, why: str | None, link: Link, reason: str) -> None:
        """``why`` (None: nothing is waiting) for the status; ``reason`` labels the count."""
        if why is not None:
            _waits.inc(1, reason)
        st = self.status
        if st.waiting != why or st.link != link.kind:
            st.waiting, st.link, st.interface = why, link.kind, link.interface
            st.save(self.state_path)


async def _wait(stop: asyncio.Event, timeout: float, also: asyncio.Event | None = None) -> None:
    waits = [asyncio.ensure_future(stop.wait())]
    if also is not None:
        waits.append(asyncio.ensure_future(also.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
