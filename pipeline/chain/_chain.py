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

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from config._models import StageConfig
from core._clock import SYSTEM_CLOCK, Clock
from core._errors import FilterError, FilterLoadError, FilterRuntimeError
from core._model import RECORD, Batch, DeadLetter, SeriesRegistry

from ..wasm._aot import ModuleCache
from . import _chain_metrics as metric
from ._check import OutputCheck
from ._engine import engine, engine_settings
from ._module import LoadedModule, load_module
from ._records import unpack
from ._slot import Slot
from ._stage import CallTimes, WasmStage

__all__ = ["Chain", "ChainResult"]

log = logging.getLogger("edgepipe.chain")


#: A stage dead letter's reason is cut to this many characters.
MAX_REASON_CHARS = 1000


class ChainResult(NamedTuple):
    batch: Batch
    dead_letters: list[DeadLetter]


class Chain:
    """An ordered list of Wasm stages (see the module docstring)."""

    def __init__(
        self,
        slots: list[Slot],
        registry: SeriesRegistry,
        clock: Clock = SYSTEM_CLOCK,
        check: OutputCheck | None = None,
    ) -> None:
        self._slots = slots
        self._check = OutputCheck() if check is None else check
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
        check = OutputCheck(cache)  # one check kernel for every stage and split
        slots: list[Slot] = []
        seen: set[str] = set()
        try:
            for cfg in stages:
                if cfg.name in seen:
                    raise FilterLoadError("stage name is used twice", stage=cfg.name, code="name")
                seen.add(cfg.name)
                mod = (loaded or {}).get(cfg.name)
                stage = WasmStage(
                    cfg, registry, base_dir=base_dir, cache=cache, loaded=mod, checker=check
                )
                slots.append(Slot(cfg, stage, clock))
            if slots:
                check.ready()  # the first batch does not wait for the kernel
        except BaseException:
            for slot in slots:
                slot.stage.close()
            raise
        return cls(slots, registry, clock, check)

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
            # _through(), without its call for a stage that takes every record
            out = self._run(slot, data, dead) if slot.match_all else self._through(slot, data, dead)
            if out is None:
                return ChainResult(Batch(), dead)
            data = out
        return ChainResult(unpack(data), dead)

    def _through(self, slot: Slot, data: bytes, dead: list[DeadLetter]) -> bytes | None:
        """One stage, honouring its ``match:``; None when the chain stopped."""
        if slot.match_all:
            return self._run(slot, data, dead)
        sub, rest = self._check.split(data, slot.selection(self.registry))
        if not sub:
            return data
        out = self._run(slot, sub, dead)
        return out + rest if out is not None and rest else out

    def _run(self, slot: Slot, data: bytes, dead: list[DeadLetter]) -> bytes | None:
        name = slot.name
        n = len(data) // RECORD.size
        metric.RECORDS.add(slot.key_in, n)
        out: bytes | None
        breaker = slot.breaker
        if breaker.failures >= breaker.threshold and not breaker.allows():
            err = FilterRuntimeError("circuit breaker open", stage=name, code="breaker_open")
            out = self._failed(slot, data, err, dead, call_guest=False)
        else:
            stage = slot.stage
            t0 = time.perf_counter()
            attempt = 1
            while True:
                try:
                    out = stage.process_raw(data, n)
                    if stage.stateful:
                        slot.good_state = self._saved(slot)
                except FilterRuntimeError as err:
                    if attempt < slot.attempts:  # on_error: stop tries again first
                        self._retrying(slot, err, attempt)
                        attempt += 1
                        continue
                    out = self._failed(slot, data, err, dead, attempts=attempt)
                else:
                    slot.batches += 1
                    if breaker.failures or slot.last_code is not None:
                        self._succeeded(slot)
                    m = len(out) // RECORD.size
                    if m < n:
                        reason = "aggregated" if slot.cfg.kind == "aggregate" else "filtered"
                        metric.DROPPED.inc(n - m, name, reason)
                    elif m > n:
                        metric.EMITTED.inc(m - n, name)
                    if stage.grown(n):
                        self._recycle(slot)
                break
            metric.SECONDS.add(slot.key, time.perf_counter() - t0)
        if out is not None:
            metric.RECORDS.add(slot.key_out, len(out) // RECORD.size)
        return out

    def _saved(self, slot: Slot) -> bytes:
        """The stage's state now; a failure drops it (counted) and fails the batch."""
        try:
            return slot.stage.snapshot()
        except FilterRuntimeError as err:
            self._drop_state(slot, "snapshot", err)
            raise

    def _succeeded(self, slot: Slot) -> None:
        if slot.breaker.failures:
            slot.breaker.success()
            metric.BREAKER.set(0, slot.name)
        if slot.last_code is not None:
            metric.FAILING.set(0, slot.name, slot.last_code)
            slot.last_code = None

    def _count(self, slot: Slot, err: FilterError) -> str:
        """Count one failure of ``slot`` (metrics, describe()); its code."""
        name, code = slot.name, err.code or "error"
        metric.ERRORS.inc(1, name, code)
        slot.failures += 1
        slot.last_error = f"{code}: {err.message}"
        if slot.last_code != code:
            if slot.last_code is not None:
                metric.FAILING.set(0, name, slot.last_code)
            slot.last_code = code
        metric.FAILING.set(1, name, code)
        return code

    def _trip(self, slot: Slot, err: FilterError) -> None:
        """A failed batch (or state operation) as the circuit breaker sees it."""
        log.warning("stage %s failed (%s): %s", slot.name, err.code or "error", err.message)
        if slot.breaker.failure():
            metric.BREAKER.set(1, slot.name)
            log.error(
                "stage %s failed %d batches in a row: circuit breaker open for %.0f s",
                slot.name,
                slot.breaker.failures,
                slot.breaker.cooldown,
            )

    def _retrying(self, slot: Slot, err: FilterError, attempt: int) -> None:
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
        slot: Slot,
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
            metric.QUARANTINED.inc(n, name)
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
                ts=int(self._clock.time() * 1000),
                topic="",
                # the code first (what dashboards group by), then the cause and the guest's
                # backtrace when it trapped
                reason=f"{reason}: {err.message}"[:MAX_REASON_CHARS],
                payload=data,
                stage=name,
            )
        )
        metric.DEAD.inc(1, name, label if label == "quarantined" else code)
        metric.DROPPED.inc(n, name, label)
        return b""

    def _drop_state(self, slot: Slot, reason: str, err: FilterError) -> None:
        slot.state_dropped += 1
        metric.STATE_DROPPED.inc(1, slot.name, reason)
        log.warning(
            "stage %s: its state could not be %s (%s: %s); that state is dropped",
            slot.name,
            "saved" if reason == "snapshot" else "restored",
            err.code or "error",
            err.message,
        )

    def _reset(self, slot: Slot) -> None:
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

    def _recycle(self, slot: Slot) -> None:
        grown = slot.stage.memory_bytes()
        slot.recycles += 1
        metric.RECYCLED.inc(1, slot.name)
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
            metric.RECORDS.inc(k, slot.name, "out")
            if k:
                metric.EMITTED.inc(k, slot.name)
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

    def time_calls(self) -> dict[str, CallTimes]:
        """Measure, from now on, where each stage's time goes (its Wasm calls, the host
        functions they call): stage name -> its running totals.  Costs a few clock reads
        per batch, so only tools ask for it."""
        for slot in self._slots:
            if slot.stage.timing is None:
                slot.stage.timing = CallTimes()
        return {slot.name: slot.stage.timing for slot in self._slots}  # type: ignore[misc]

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
        self._check.close()
        for slot in self._slots:
            slot.stage.close()
            # a closed chain's stages are neither tripped nor failing (a deploy replaced
            # them, or the process ends): their gauges must not stay at 1
            metric.BREAKER.set(0, slot.name)
            if slot.last_code is not None:
                metric.FAILING.set(0, slot.name, slot.last_code)

    def _publish_gauges(self) -> None:
        for slot in self._slots:
            metric.BREAKER.set(1 if slot.breaker.status() != "closed" else 0, slot.name)
            if slot.last_code is not None:
                metric.FAILING.set(1, slot.name, slot.last_code)

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
