"""The filter chain: Wasm stages in order, with error policy, circuit breakers and state.

``Chain.build(stages, registry, base_dir=..., cache_dir=...)`` loads every stage (a bad
module raises :class:`FilterLoadError` naming the stage); ``process(batch)`` runs a batch
through them.  A stage only sees the records its ``match:`` selects; the others are
passed on after its output.  When a stage fails (trap, exhausted limit, malformed
output) its instance is rebuilt from its last good state and ``on_error`` decides:

* ``dead_letter`` -- the stage's input goes to a :class:`DeadLetter` and is dropped;
* ``pass``        -- the stage's input goes on unchanged, as if the stage were absent;
* ``stop``        -- the stage's input is not let past it unprocessed: the batch is tried
  again on a fresh instance, up to ``limits.stop_attempts`` attempts in all; when every
  attempt fails, the stage's input is *quarantined*: one dead letter ("quarantined after N
  attempts"), an ALARM log line and ``edgepipe_stage_quarantined_total``.  The records the
  stage does not match, and the other stages, go on: one stage never stops the pipeline.

A stage that fails ``limits.breaker_failures`` batches in a row is *tripped*: for
``limits.breaker_cooldown_s`` its batches take the ``on_error`` path without calling the
guest, then one batch is tried again (half-open).

Stateful stages are snapshotted after every successful batch; :meth:`Chain.snapshot`
returns those blobs for the store to commit with the batch, and a trap restores them.  A
state that cannot be taken (``ep_snapshot`` traps, returns a bad pointer or length) or
given back (``ep_restore`` traps or refuses) fails the stage like any other failure, and
the state is dropped with a logged reason counted in ``edgepipe_stage_state_dropped_total``
(the stage then runs cold); nothing about a stage's state ever raises out of the chain.

An instance whose linear memory grew well past its steady size during a batch
(:meth:`WasmStage.grown`) is recycled before the next one: a fresh instance restored from
the state just saved, so the memory a ``memory.grow`` returns to the system.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from config._models import StageConfig
from core._clock import SYSTEM_CLOCK, Clock
from core._errors import FilterError, FilterLoadError, FilterRuntimeError
from core._metrics import METRICS
from core._model import RECORD, Batch, DeadLetter, SeriesRegistry

from ._aot import ModuleCache
from ._engine import engine, engine_settings
from ._module import LoadedModule, load_module
from ._records import unpack
from ._stage import WasmStage

__all__ = ["Chain", "ChainResult"]

log = logging.getLogger("edgepipe.chain")

_RECORDS = METRICS.counter(
    "edgepipe_stage_records_total",
    "Records into and out of each filter stage",
    ("stage", "direction"),
)
_DROPPED = METRICS.counter(
    "edgepipe_readings_dropped_total",
    "Readings dropped, by stage and reason (filtered, aggregated, dead_letter; stage store: quota)",
    ("stage", "reason"),
)
_EMITTED = METRICS.counter(
    "edgepipe_readings_emitted_total",
    "Readings created by a stage (aggregates, expansions): "
    "in = dropped (but stage store) + in_flight + stored - emitted",
    ("stage",),
)
_ERRORS = METRICS.counter(
    "edgepipe_stage_errors_total", "Filter stage failures, by trap/error code", ("stage", "code")
)
_BREAKER = METRICS.gauge(
    "edgepipe_stage_breaker_open", "1 while a stage's circuit breaker is tripped", ("stage",)
)
_SECONDS = METRICS.counter(
    "edgepipe_stage_seconds_total", "Time spent in each filter stage", ("stage",)
)
_FAILING = METRICS.gauge(
    "edgepipe_stage_failing",
    "1 while a stage's last batch failed, labelled with the trap/error code of that failure",
    ("stage", "code"),
)
_DEAD = METRICS.counter(
    "edgepipe_dead_letters_total", "messages or batches dead-lettered", ["stage", "reason"]
)
_QUARANTINED = METRICS.counter(
    "edgepipe_stage_quarantined_total",
    "Readings an on_error: stop stage failed on limits.stop_attempts times, set aside as "
    "dead letters so the rest of the data flows",
    ("stage",),
)
_STATE_DROPPED = METRICS.counter(
    "edgepipe_stage_state_dropped_total",
    "Stage states that could not be saved (snapshot) or given back (restore) and were dropped",
    ("stage", "reason"),
)
_RECYCLED = METRICS.counter(
    "edgepipe_stage_recycles_total",
    "Instances replaced between batches because their memory grew past its steady size",
    ("stage",),
)


class ChainResult(NamedTuple):
    batch: Batch
    dead_letters: list[DeadLetter]


class _Breaker:
    __slots__ = ("threshold", "cooldown", "failures", "open_until", "trips", "_clock")

    def __init__(self, threshold: int, cooldown: float, clock: Clock) -> None:
        self.threshold, self.cooldown = threshold, cooldown
        self._clock = clock
        self.failures = 0
        self.open_until = 0.0
        self.trips = 0

    def status(self, now: float | None = None) -> str:
        if self.failures < self.threshold:
            return "closed"
        now = self._clock.monotonic() if now is None else now
        return "open" if now < self.open_until else "half_open"

    def allows(self) -> bool:
        return self.failures < self.threshold or self._clock.monotonic() >= self.open_until

    def success(self) -> None:
        self.failures = 0

    def failure(self) -> bool:
        """Count a failure; True when this trips (or re-trips) the breaker."""
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = self._clock.monotonic() + self.cooldown
            self.trips += 1
            return True
        return False


class _Slot:
    """A stage in the chain plus everything the chain keeps about it."""

    def __init__(self, cfg: StageConfig, stage: WasmStage, clock: Clock) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.stage = stage
        lim = cfg.limits
        self.breaker = _Breaker(lim.breaker_failures, lim.breaker_cooldown_s, clock)
        self.good_state: bytes | None = None  # last snapshot after a successful batch
        m = cfg.match
        self.devices = m.devices
        self.metrics = m.metrics
        self.match_all = m.devices is None and m.metrics is None
        self._matches: dict[int, bool] = {}
        self.last_error: str | None = None
        self.last_code: str | None = None  # the code of the last failure, while failing
        self.batches = self.failures = 0
        self.quarantined = self.state_dropped = self.recycles = 0
        self.attempts = cfg.limits.stop_attempts if cfg.on_error == "stop" else 1

    def matches(self, sid: int, registry: SeriesRegistry) -> bool:
        hit = self._matches.get(sid)
        if hit is None:
            key = registry.key(sid)
            hit = (
                self.devices is None
                or any(fnmatch.fnmatchcase(key.device, p) for p in self.devices)
            ) and (
                self.metrics is None
                or any(fnmatch.fnmatchcase(key.metric, p) for p in self.metrics)
            )
            self._matches[sid] = hit
        return hit

    def split(self, batch: Batch, registry: SeriesRegistry) -> tuple[Batch, Batch | None]:
        if self.match_all:
            return batch, None
        hits = [self.matches(s, registry) for s in batch.series]
        if all(hits):
            return batch, None
        if not any(hits):
            return Batch(), batch
        return (
            batch.take(i for i, h in enumerate(hits) if h),
            batch.take(i for i, h in enumerate(hits) if not h),
        )


class Chain:
    """An ordered list of Wasm stages (see the module docstring)."""

    def __init__(
        self, slots: list[_Slot], registry: SeriesRegistry, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._slots = slots
        self._clock = clock
        self.registry = registry
        self.stopped: str | None = None
        self._closed = False

    # -- construction ----------------------------------------------------------------
    @classmethod
    def build(
        cls,
        stages: Iterable[StageConfig],
        registry: SeriesRegistry,
        *,
        base_dir: Path,
        cache_dir: Path | None,
        loaded: dict[str, LoadedModule] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> Chain:
        """Load, validate and instantiate every stage; raise :class:`FilterLoadError`.

        ``loaded`` maps stage names to modules compiled beforehand (see
        :func:`compile_stages`), so a hot swap only instantiates on the caller's thread.
        ``clock`` times the circuit breakers' cooldowns.
        """
        cache = ModuleCache(cache_dir, engine(), engine_settings())
        slots: list[_Slot] = []
        seen: set[str] = set()
        try:
            for cfg in stages:
                if cfg.name in seen:
                    raise FilterLoadError("stage name is used twice", stage=cfg.name, code="name")
                seen.add(cfg.name)
                mod = (loaded or {}).get(cfg.name)
                stage = WasmStage(cfg, registry, base_dir=base_dir, cache=cache, loaded=mod)
                slots.append(_Slot(cfg, stage, clock))
        except BaseException:
            for slot in slots:
                slot.stage.close()
            raise
        return cls(slots, registry, clock)

    # -- running -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slots)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._slots]

    def process(self, batch: Batch) -> ChainResult:
        """Run ``batch`` through every stage.  Between stages the records stay packed in
        the ABI layout (no per-stage ``Batch`` conversion)."""
        if self._closed:
            raise FilterRuntimeError("the chain is closed", code="closed")
        if self.stopped is not None:
            raise FilterRuntimeError(f"the chain stopped: {self.stopped}", code="stopped")
        dead: list[DeadLetter] = []
        data = batch.pack()
        for slot in self._slots:
            if not data:
                break
            out = self._through(slot, data, dead)
            if out is None:
                return ChainResult(Batch(), dead)
            data = out
        return ChainResult(unpack(data), dead)

    def _through(self, slot: _Slot, data: bytes, dead: list[DeadLetter]) -> bytes | None:
        """One stage, honouring its ``match:``; None when the chain stopped."""
        if slot.match_all:
            return self._run(slot, data, dead)
        sub, rest = slot.split(unpack(data), self.registry)
        if not len(sub):
            return data
        if rest is None:
            return self._run(slot, data, dead)
        out = self._run(slot, sub.pack(), dead)
        return None if out is None else out + rest.pack()

    def _run(self, slot: _Slot, data: bytes, dead: list[DeadLetter]) -> bytes | None:
        name = slot.name
        n = len(data) // RECORD.size
        _RECORDS.inc(n, name, "in")
        out: bytes | None
        if not slot.breaker.allows():
            err = FilterRuntimeError("circuit breaker open", stage=name, code="breaker_open")
            out = self._failed(slot, data, err, dead, call_guest=False)
        else:
            t0 = time.perf_counter()
            attempt = 1
            while True:
                try:
                    out = slot.stage.process_raw(data, n)
                    if slot.stage.stateful:
                        slot.good_state = self._saved(slot)
                except FilterRuntimeError as err:
                    if attempt < slot.attempts:  # on_error: stop tries again first
                        self._retrying(slot, err, attempt)
                        attempt += 1
                        continue
                    out = self._failed(slot, data, err, dead, attempts=attempt)
                else:
                    slot.batches += 1
                    self._succeeded(slot)
                    m = len(out) // RECORD.size
                    if m < n:
                        reason = "aggregated" if slot.cfg.kind == "aggregate" else "filtered"
                        _DROPPED.inc(n - m, name, reason)
                    elif m > n:
                        _EMITTED.inc(m - n, name)
                    if slot.stage.grown(n):
                        self._recycle(slot)
                break
            _SECONDS.inc(time.perf_counter() - t0, name)
        if out is not None:
            _RECORDS.inc(len(out) // RECORD.size, name, "out")
        return out

    def _saved(self, slot: _Slot) -> bytes:
        """The stage's state now; a failure drops it (counted) and fails the batch."""
        try:
            return slot.stage.snapshot()
        except FilterRuntimeError as err:
            self._drop_state(slot, "snapshot", err)
            raise

    def _succeeded(self, slot: _Slot) -> None:
        if slot.breaker.failures:
            slot.breaker.success()
            _BREAKER.set(0, slot.name)
        if slot.last_code is not None:
            _FAILING.set(0, slot.name, slot.last_code)
            slot.last_code = None

    def _count(self, slot: _Slot, err: FilterError) -> str:
        """Count one failure of ``slot`` (metrics, describe()); its code."""
        name, code = slot.name, err.code or "error"
        _ERRORS.inc(1, name, code)
        slot.failures += 1
        slot.last_error = f"{code}: {err.message}"
        if slot.last_code != code:
            if slot.last_code is not None:
                _FAILING.set(0, name, slot.last_code)
            slot.last_code = code
        _FAILING.set(1, name, code)
        return code

    def _trip(self, slot: _Slot, err: FilterError) -> None:
        """A failed batch (or state operation) as the circuit breaker sees it."""
        log.warning("stage %s failed (%s): %s", slot.name, err.code or "error", err.message)
        if slot.breaker.failure():
            _BREAKER.set(1, slot.name)
            log.error(
                "stage %s failed %d batches in a row: circuit breaker open for %.0f s",
                slot.name,
                slot.breaker.failures,
                slot.breaker.cooldown,
            )

    def _retrying(self, slot: _Slot, err: FilterError, attempt: int) -> None:
        code = self._count(slot, err)
        log.warning(
            "stage %s failed (%s), attempt %d of %d: %s",
            slot.name,
            code,
            attempt,
            slot.attempts,
            err.message,
        )
        self._reset(slot)

    def _failed(
        self,
        slot: _Slot,
        data: bytes,
        err: FilterError,
        dead: list[DeadLetter],
        *,
        call_guest: bool = True,
        attempts: int = 1,
    ) -> bytes | None:
        """Apply the stage's on_error policy; the records to pass on (never None: a stage
        cannot stop the chain)."""
        name = slot.name
        code = self._count(slot, err)
        if call_guest:
            self._trip(slot, err)
            self._reset(slot)
        policy = slot.cfg.on_error
        if policy == "pass":
            return data
        if not data:
            return b""
        n = len(data) // RECORD.size
        if policy == "stop":
            why = f"after {attempts} attempts" if call_guest else "(circuit breaker open)"
            reason, label = f"stage {name}: quarantined {why}: {code}", "quarantined"
            slot.quarantined += n
            _QUARANTINED.inc(n, name)
            log.error(
                "ALARM: stage %s (on_error: stop) failed %s on a batch of %d readings "
                "(%s: %s); they are quarantined as a dead letter and the pipeline goes on",
                name,
                why,
                n,
                code,
                err.message,
            )
        else:
            reason, label = f"stage {name}: trap: {code}", "dead_letter"
        dead.append(
            DeadLetter(
                ts=int(time.time() * 1000),
                topic="",
                reason=reason,
                payload=data,
                stage=name,
            )
        )
        _DEAD.inc(1, name, label if label == "quarantined" else code)
        _DROPPED.inc(n, name, label)
        return b""

    def _drop_state(self, slot: _Slot, reason: str, err: FilterError) -> None:
        slot.state_dropped += 1
        _STATE_DROPPED.inc(1, slot.name, reason)
        log.warning(
            "stage %s: its state could not be %s (%s: %s); that state is dropped",
            slot.name,
            "saved" if reason == "snapshot" else "restored",
            err.code or "error",
            err.message,
        )

    def _reset(self, slot: _Slot) -> None:
        """A fresh instance with the last good state; a state it refuses is dropped and
        the stage starts cold.  Failing even that, every batch fails fast (``no_instance``)
        into on_error and tries again."""
        try:
            slot.stage.reset(slot.good_state)
            return
        except FilterRuntimeError as e:
            if not slot.good_state or slot.stage.broken is not None:
                log.error("stage %s could not be re-instantiated: %s", slot.name, e.message)
                return
            self._count(slot, e)
            self._drop_state(slot, "restore", e)
            slot.good_state = None
        try:
            slot.stage.reset(None)
        except FilterRuntimeError as e:
            log.error("stage %s could not be re-instantiated: %s", slot.name, e.message)

    def _recycle(self, slot: _Slot) -> None:
        grown = slot.stage.memory_bytes()
        slot.recycles += 1
        _RECYCLED.inc(1, slot.name)
        log.info(
            "stage %s: linear memory grew to %d KiB (steady %d KiB); recycling the instance",
            slot.name,
            grown // 1024,
            slot.stage.steady_bytes // 1024,
        )
        self._reset(slot)

    def flush(self) -> ChainResult:
        """Emit pending aggregate output (``ep_flush``), carried through later stages."""
        dead: list[DeadLetter] = []
        carry = b""
        for slot in self._slots:
            if carry:
                out = self._through(slot, carry, dead)
                if out is None:
                    return ChainResult(Batch(), dead)
                carry = out
            if not slot.stage.has_flush:
                continue
            try:
                flushed = slot.stage.flush_raw()
                if slot.stage.stateful:
                    slot.good_state = self._saved(slot)
            except FilterRuntimeError as err:
                self._failed(slot, b"", err, dead)
                continue
            k = len(flushed) // RECORD.size
            _RECORDS.inc(k, slot.name, "out")
            if k:
                _EMITTED.inc(k, slot.name)
            carry += flushed
        return ChainResult(unpack(carry), dead)

    # -- state ---------------------------------------------------------------------------
    def snapshot(self) -> dict[str, bytes]:
        """Stage name -> state blob (stateful stages), as of the last successful batch."""
        out: dict[str, bytes] = {}
        for slot in self._slots:
            if slot.stage.stateful:
                if slot.good_state is None:
                    try:
                        slot.good_state = self._saved(slot)
                    except FilterRuntimeError as err:
                        # nothing to save (the stored one stays); the stage fails like any
                        self._count(slot, err)
                        self._trip(slot, err)
                        self._reset(slot)
                        continue
                out[slot.name] = slot.good_state
        return out

    def restore(self, states: dict[str, bytes]) -> None:
        """Load state blobs saved by :meth:`snapshot` (unknown stage names are ignored).  A
        blob its stage refuses (or traps on) is dropped, counted and logged; that stage
        starts cold and its breaker counts the failure.  Never raises."""
        by_name = {s.name: s for s in self._slots}
        for name, blob in states.items():
            slot = by_name.get(name)
            if slot is None or not slot.stage.stateful:
                log.info("ignoring saved state of stage %s (not in this chain)", name)
                continue
            try:
                slot.stage.restore(blob)
            except FilterRuntimeError as e:
                self._count(slot, e)
                self._drop_state(slot, "restore", e)
                self._trip(slot, e)
                slot.good_state = None
                self._reset(slot)
                continue
            slot.good_state = blob

    def hand_over(self, new: Chain) -> ChainResult:
        """Swap to ``new``: flush this chain, move state to same-named stages running the
        same module, close this chain.  Store the returned output like any batch."""
        result = self.flush()
        states = self.snapshot()
        same = {
            s.name
            for s in new._slots
            for o in self._slots
            if s.name == o.name and s.stage.loaded.sha256 == o.stage.loaded.sha256
        }
        new.restore({k: v for k, v in states.items() if k in same})
        self.close()
        new._publish_gauges()  # after close() zeroed the gauges of this chain's stages
        return result

    # -- status ----------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        now = self._clock.monotonic()
        out = []
        for slot in self._slots:
            st = slot.stage
            out.append(
                {
                    "name": slot.name,
                    "kind": slot.cfg.kind,
                    "module": str(st.loaded.path),
                    "sha256": st.loaded.sha256,
                    "stateful": st.stateful,
                    "state_bytes": len(slot.good_state or b""),
                    "on_error": slot.cfg.on_error,
                    "breaker": slot.breaker.status(now),
                    "consecutive_failures": slot.breaker.failures,
                    "batches": slot.batches,
                    "failures": slot.failures,
                    "instances": st.instances,
                    "last_error": slot.last_error,
                    "last_code": slot.last_code,
                    "quarantined": slot.quarantined,
                    "state_dropped": slot.state_dropped,
                    "recycles": slot.recycles,
                    "memory_bytes": st.memory_bytes(),
                }
            )
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            slot.stage.close()
            # a closed chain's stages are neither tripped nor failing (a deploy replaced
            # them, or the process ends): their gauges must not stay at 1
            _BREAKER.set(0, slot.name)
            if slot.last_code is not None:
                _FAILING.set(0, slot.name, slot.last_code)

    def _publish_gauges(self) -> None:
        for slot in self._slots:
            _BREAKER.set(1 if slot.breaker.status() != "closed" else 0, slot.name)
            if slot.last_code is not None:
                _FAILING.set(1, slot.name, slot.last_code)

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def compile_stages(
    stages: Iterable[StageConfig], *, base_dir: Path, cache_dir: Path | None
) -> dict[str, LoadedModule]:
    """Validate and compile every stage's module (thread-safe; fills the AOT cache)."""
    cache = ModuleCache(cache_dir, engine(), engine_settings())
    return {cfg.name: load_module(cfg, base_dir, cache) for cfg in stages}
