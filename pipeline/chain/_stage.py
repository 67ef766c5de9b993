"""One sandboxed WebAssembly filter stage (ABI v1, see filters/ABI.md).

A stage owns one wasmtime Store and one instance of its module, reused across batches.
Each batch costs one ``ep_input`` call, one ``memmove`` of the batch's packed records
into linear memory, one ``ep_process`` call, one read of the output records and one call
of the output check (:mod:`._check`): there is no per-record Python work.

The sandbox: no WASI and only the three ``edgepipe`` host functions; fuel per call
(``Config.consume_fuel``), a wall-clock deadline per call (epoch interruption driven by
the shared ticker thread, :data:`._engine.TICKER`, that only runs while a guest call is
in flight), a linear memory cap (``Store.set_limits``), and validation of everything the
guest returns (pointer bounds, record count, series ids, the stage kind's contract).
Any failure raises :class:`FilterRuntimeError` with a short ``code``; after a failure
the instance is considered corrupt and :meth:`WasmStage.reset` builds a fresh one.  Every
entry point (``ep_init``, ``ep_process``, ``ep_flush``, ``ep_snapshot``, ``ep_restore``)
fails that way and only that way: host functions turn their own errors into traps, a failed
instantiation leaves the stage without an instance (each later call fails fast with code
``no_instance`` until a reset succeeds), never with calls into a freed store.  A guest may
create at most :data:`MAX_DERIVED_SERIES` series and report error numbers 1-255 (others
are ``guest_error``), so it cannot grow the registry or the metrics without bound.
:meth:`WasmStage.grown` tells when linear memory grew well past its steady size, so the
chain can recycle the instance between batches and the memory returns to the system.
Calls and memory copies go through :mod:`._ffi`.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import time
from pathlib import Path

import wasmtime

from config._models import StageConfig
from core._errors import FilterLoadError, FilterRuntimeError
from core._metrics import METRICS
from core._model import Batch, SeriesRegistry

from ..wasm._aot import ModuleCache
from ..wasm._ffi import Budget, GuestCall, GuestMemory, HostTrap
from ..wasm._ffi import memmove as _memmove
from ..wasm._ffi import string_at as _string_at
from ._abi import ABI_VERSION, flatten_config
from ._check import KEYS_CHANGED, UNKNOWN_SERIES, OutputCheck
from ._declared import ConfigProblem
from ._engine import TICK_S, TICKER, engine
from ._host import MAX_DERIVED_SERIES, make_linker
from ._module import LoadedModule, load_module
from ._records import REC, unpack

__all__ = ["MAX_DERIVED_SERIES", "RECYCLE_SLACK", "CallTimes", "StageConfigError", "WasmStage"]

log = logging.getLogger("edgepipe.filter")

_UNDECLARED = METRICS.counter(
    "edgepipe_filter_undeclared_modules_total",
    "Filter modules loaded without a config declaration (their config is not checked); "
    "counted once per module",
)
_warned: set[str] = set()  # sha256 of the modules warned about

#: linear memory growth over the steady size that is always tolerated between batches;
#: beyond it (and beyond 8 record sizes per record of the batch) the instance is recycled
_TS_VALUE = struct.Struct("<qd")  # the timestamp and value of a packed record
RECYCLE_SLACK = 4 * 1024 * 1024


class CallTimes:
    """Where a stage's time goes, when it is measured (``edgepipe filter test``):
    ``guest_s`` inside its Wasm calls (host functions included), ``host_call_s`` and
    ``host_calls`` in the host functions it called (``series_name``, ``series_derive``,
    ``log``)."""

    __slots__ = ("guest_s", "host_call_s", "host_calls")

    def __init__(self) -> None:
        self.guest_s = self.host_call_s = 0.0
        self.host_calls = 0


class StageConfigError(FilterLoadError):
    """A stage's ``config:`` does not fit its module's declaration; ``problems`` holds
    each one with its YAML path inside ``config:``."""

    def __init__(self, problems: list[ConfigProblem], *, stage: str) -> None:
        self.problems = problems
        super().__init__("; ".join(map(str, problems)), stage=stage, code="bad_config")


#: What a trap's text may not carry as it is (the guest's own function names are in it):
#: control characters (a new log line, terminal escapes), bidi controls (which reorder what
#: an operator reads) and lone surrogates.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
#: Most characters of a trap's cause kept.
MAX_CAUSE_CHARS = 300


def _shown(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, its unsafe characters escaped (``\\n``,
    ``\\u202e``): one line, read as it is."""
    cut = text[:limit] + ("…" if len(text) > limit else "")
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode(), cut)


def _trap_text(message: str, fallback: str) -> str:
    """A trap's cause (wasmtime puts it after the backtrace, under the last "Caused by:":
    a function name of the backtrace may say "Caused by:" too)."""
    if not message:
        return fallback
    _, sep, cause = message.rpartition("Caused by:")
    if sep:
        text = " ".join(ln.strip() for ln in cause.strip().splitlines() if ln.strip())
        return _shown(text.removeprefix("wasm trap: "), MAX_CAUSE_CHARS) or fallback
    first = cause.strip().splitlines()[0] if cause.strip() else fallback
    return _shown(first, MAX_CAUSE_CHARS)


#: Frames of a trap's backtrace kept (innermost first); deeper ones are counted.
MAX_FRAMES = 8


def _backtrace(trap: wasmtime.Trap) -> tuple[str, ...]:
    """The guest frames of ``trap``, innermost first: ``name@0xOFFSET`` (the function's
    name from the module's name section, cut and escaped as :func:`_shown` does, else
    ``<wasm function N>``; the offset of the
    trapping instruction or call in the module), at most :data:`MAX_FRAMES` of them."""
    try:
        frames = trap.frames
    except Exception:  # a trap without a backtrace (or one wasmtime cannot give)
        return ()
    out = []
    for f in frames[:MAX_FRAMES]:
        name = f.func_name or f"<wasm function {f.func_index}>"
        offset = f.module_offset
        out.append(f"{_shown(name, 64)}@" + (f"0x{offset:x}" if offset < 1 << 32 else "?"))
    if len(frames) > MAX_FRAMES:
        out.append(f"... {len(frames) - MAX_FRAMES} more frames")
    return tuple(out)


_TRAP_NAMES = {
    getattr(wasmtime.TrapCode, n): n.lower() for n in dir(wasmtime.TrapCode) if n.isupper()
}
_TRAP_NAMES[wasmtime.TrapCode.OUT_OF_FUEL] = "out_of_fuel"
_TRAP_NAMES[wasmtime.TrapCode.INTERRUPT] = "timeout"


def _u32(x: int) -> int:
    return x & 0xFFFFFFFF


class WasmStage:
    """One filter stage: a module instance plus its limits and kind contract."""

    def __init__(
        self,
        cfg: StageConfig,
        registry: SeriesRegistry,
        *,
        base_dir: Path,
        cache: ModuleCache | None = None,
        loaded: LoadedModule | None = None,
        checker: OutputCheck | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.kind = cfg.kind
        self.registry = registry
        self.loaded = loaded or load_module(cfg, base_dir, cache)
        lim = cfg.limits
        self._fuel = lim.fuel
        # +1 for the tick already under way, +1 for an epoch the ticker moved just before
        # it counted the move (see _arm)
        self._ticks = max(1, math.ceil(lim.timeout_ms / 1000 / TICK_S)) + 2
        self._max_output = lim.max_output
        self._mem_cap = lim.memory_mb * 1024 * 1024
        self._check_config()
        try:
            self._config_text = flatten_config(cfg.config).encode()
        except ValueError as e:
            raise FilterLoadError(str(e), stage=self.name, code="bad_config") from None
        #: the kinds whose output may not have more records than their input
        self._bounded = cfg.kind in ("filter", "filter_map", "map")
        self.stateful = "ep_snapshot" in self.loaded.exports
        self.has_flush = "ep_flush" in self.loaded.exports
        self._log_tokens = 20.0
        self._log_at = time.monotonic()
        self._last_log: str | None = None  # the guest's last message (shown if init refuses)
        self._store: wasmtime.Store | None = None
        # the output check kernel: the chain's shared one, else the stage's own (made on
        # first use, so a stage that is only validated never instantiates it)
        self._own_check = checker is None
        self._check = OutputCheck(cache) if checker is None else checker
        self.derived = 0  # series this stage created with series_derive
        self.steady_bytes = 0  # linear memory right after instantiation (and restore)
        self.broken: str | None = None  # why the stage has no instance, if it has none
        self._linker = self._make_linker()
        self.instances = 0
        #: where its calls' time goes, when asked for (:meth:`Chain.time_calls`)
        self.timing: CallTimes | None = None
        try:
            self._instantiate()
        except FilterRuntimeError as e:
            raise FilterLoadError(e.message, stage=self.name, code=e.code) from None

    def _check_config(self) -> None:
        decl = self.loaded.declaration
        if decl is None:
            if self.loaded.sha256 not in _warned:
                _warned.add(self.loaded.sha256)
                _UNDECLARED.inc()
                log.warning(
                    "stage %s: module %s declares no configuration (no %s section); its "
                    "config is passed on unchecked",
                    self.name,
                    self.loaded.path.name,
                    "edgepipe.config",
                )
            return
        problems = decl.check(self.cfg.config)
        if problems:
            raise StageConfigError(problems, stage=self.name)

    # -- host functions ----------------------------------------------------------
    def _make_linker(self) -> wasmtime.Linker:
        return make_linker(self)

    # -- instance lifecycle ------------------------------------------------------------
    def _instantiate(self) -> None:
        """A fresh instance; on failure the stage is left with none (``broken`` says why)."""
        self._drop_store()
        try:
            self._instantiate_once()
        except BaseException as e:
            self._drop_store()
            self.broken = e.message if isinstance(e, FilterRuntimeError) else type(e).__name__
            raise
        self.broken = None
        self.steady_bytes = self._mem.span()[1]

    def _instantiate_once(self) -> None:
        store = wasmtime.Store(engine())
        store.set_limits(memory_size=self._mem_cap, instances=1, tables=1, memories=1)
        self._store = store
        self._budget = Budget(store, self._fuel, self._ticks)
        self._armed_at = -1  # TICKER.ticks when the deadline was last set
        self.instances += 1
        self._arm()
        TICKER.enter()
        try:
            instance = self._linker.instantiate(store, self.loaded.module)
        except (wasmtime.Trap, wasmtime.WasmtimeError, HostTrap) as e:
            raise self._error(e, "instantiate") from None
        finally:
            TICKER.exit()
        ex = instance.exports(store)
        self._mem = GuestMemory(store, ex["memory"])

        def fast(name: str, nparams: int, i64: bool) -> GuestCall | None:
            f = ex.get(name)
            return GuestCall(store, f, nparams, i64) if f is not None else None

        self._f_version = fast("ep_abi_version", 0, False)
        self._f_input = fast("ep_input", 1, False)
        self._f_process = fast("ep_process", 1, True)
        self._f_alloc = fast("ep_alloc", 1, False)
        self._f_init = fast("ep_init", 2, False)
        self._f_flush = fast("ep_flush", 0, True)
        self._f_snapshot = fast("ep_snapshot", 0, True)
        self._f_restore = fast("ep_restore", 2, False)
        version = self._call(self._f_version, "ep_abi_version")
        if version != ABI_VERSION:
            raise FilterRuntimeError(
                f"ep_abi_version() returned {version}; this host speaks ABI v{ABI_VERSION}",
                stage=self.name,
                code="abi_version",
            )
        if self._f_init is not None:
            text = self._config_text
            ptr = _u32(self._call(self._f_alloc, "ep_alloc", len(text)))
            self._guarded_write(ptr, text, "ep_alloc")
            self._last_log = None
            rc = self._call(self._f_init, "ep_init", ptr, len(text))
            if rc != 0:
                said = f": {self._last_log}" if self._last_log else ""
                raise FilterRuntimeError(
                    f"ep_init refused the config (returned {rc}){said}",
                    stage=self.name,
                    code="init",
                )

    def _arm(self) -> None:
        """A fresh fuel budget and wall-clock deadline (once per batch / per operation):
        the deadline is set again only when the epoch moved since it was last set."""
        ticks = TICKER.ticks
        if ticks == self._armed_at:
            self._budget.refuel()
        else:
            self._budget.arm()
            self._armed_at = ticks

    def _drop_store(self) -> None:
        # no call may reach the old store's context once it is freed
        self._f_process = self._f_input = self._f_flush = None  # type: ignore[assignment]
        self._f_snapshot = self._f_restore = self._f_alloc = self._f_init = None
        # nor a host function (say, from the next instance's start function) its memory
        self._mem = None  # type: ignore[assignment]
        self._store = None  # frees the instance and its memory

    def grown(self, n_records: int) -> bool:
        """True when linear memory grew past its steady size by more than a batch of
        ``n_records`` can explain (see :data:`RECYCLE_SLACK`): time to recycle."""
        if self._store is None:
            return False
        allowed = max(RECYCLE_SLACK, 8 * REC * n_records)
        # the size the batch's last look saw: its output read, or its snapshot's
        return self._mem.size - self.steady_bytes > allowed

    def memory_bytes(self) -> int:
        """The instance's linear memory size now (0 without an instance)."""
        return self._mem.span()[1] if self._store is not None else 0

    def reset(self, state: bytes | None = None) -> None:
        """A fresh instance (after a trap), restoring ``state`` if given."""
        self._instantiate()
        if state:
            self.restore(state)
            self.steady_bytes = max(self.steady_bytes, self._mem.span()[1])

    def close(self) -> None:
        self._drop_store()
        self._f_process = self._f_input = None  # type: ignore[assignment]
        if self._own_check:
            self._check.close()

    # -- calls -------------------------------------------------------------------------
    def _error(self, e: BaseException, what: str) -> FilterRuntimeError:
        if isinstance(e, HostTrap):
            return FilterRuntimeError(f"{what}: {e}", stage=self.name, code=e.code)
        if isinstance(e, wasmtime.Trap):
            code = _TRAP_NAMES.get(e.trap_code, "trap") if e.trap_code is not None else "trap"
            cause = _trap_text(e.message, code)
            frames = _backtrace(e)
            where = f"; wasm backtrace: {' < '.join(frames)}" if frames else ""
            return FilterRuntimeError(
                f"{what}: trap ({code}): {cause}{where}",
                stage=self.name,
                code=code,
                backtrace=frames,
            )
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        low = str(e).lower()
        code = "out_of_fuel" if "fuel" in low else "limit" if "limit" in low else "error"
        return FilterRuntimeError(f"{what}: {msg}", stage=self.name, code=code)

    def _call(self, fn: GuestCall | None, what: str, *args: int, arm: bool = True) -> int:
        if fn is None or self._store is None:
            raise self._closed_error(what)
        if arm:
            self._arm()
        TICKER.enter()
        try:
            if self.timing is None:
                return fn(*args)
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.timing.guest_s += time.perf_counter() - t
        except (wasmtime.Trap, wasmtime.WasmtimeError, HostTrap) as e:
            raise self._error(e, what) from None
        finally:
            TICKER.exit()

    def _closed_error(self, what: str) -> FilterRuntimeError:
        if self.broken is not None:
            return FilterRuntimeError(
                f"{what}: no instance ({self.broken})", stage=self.name, code="no_instance"
            )
        return FilterRuntimeError(f"{what}: stage is closed", stage=self.name, code="closed")

    def _guarded_write(self, ptr: int, data: bytes, what: str) -> None:
        if not data:
            return
        if ptr == 0:
            raise FilterRuntimeError(
                f"{what} could not allocate {len(data)} bytes", stage=self.name, code="alloc"
            )
        try:
            self._mem.write(ptr, data)
        except HostTrap as e:
            raise self._error(e, what) from None

    def _output(self, r: int, what: str, n_in: int) -> bytes:
        """The records a guest's ``(ptr << 32) | n`` result points at, checked: its
        count against the stage's limits (at most ``n_in`` for the kinds that cannot
        add records), its range against linear memory as it is now."""
        if r < 0:
            # a bounded set of codes: they become metric labels
            code = f"guest_error_{-r}" if -r <= 255 else "guest_error"
            raise FilterRuntimeError(f"{what} reported error {-r}", stage=self.name, code=code)
        n = r & 0xFFFFFFFF
        if n > self._max_output or (n > n_in and self._bounded):
            limit = min(self._max_output, n_in) if self._bounded else self._max_output
            raise FilterRuntimeError(
                f"{what} returned {n} records; at most {limit} allowed for a {self.kind} stage",
                stage=self.name,
                code="output_count",
            )
        ptr, size = r >> 32, n * REC
        base, mem_size = self._mem.span()  # also what grown() reads
        if size and ptr + size > mem_size:
            raise FilterRuntimeError(
                f"{what} returned an output pointer outside guest memory: guest range "
                f"[{ptr}, {ptr + size}) is outside its memory",
                stage=self.name,
                code="output_pointer",
            )
        return _string_at(base + ptr, size) if size else b""

    def process_raw(self, data: bytes, n: int) -> bytes:
        """Run ``n`` packed records through the guest; the packed output records.

        One fuel budget and one deadline cover the whole batch (``ep_input`` and
        ``ep_process``).  Raises :class:`FilterRuntimeError` on any failure.
        """
        if n == 0:
            return b""
        if self._store is None:
            raise self._closed_error("ep_input")
        self._arm()
        what = "ep_input"
        TICKER.enter()
        tm = self.timing
        try:
            if tm is not None:
                t0 = time.perf_counter()
            ptr = self._f_input(n) & 0xFFFFFFFF
            if tm is not None:
                tm.guest_s += time.perf_counter() - t0
            # the memory's address and the size last seen: it never moves and never
            # shrinks (see _engine.engine), so only a buffer beyond that size needs a look
            mem = self._mem
            base, size = mem.base, mem.size
            if ptr + len(data) > size:
                base, size = mem.span()
            if ptr == 0 or ptr + len(data) > size:
                raise FilterRuntimeError(
                    f"ep_input({n}) returned an unusable buffer ({ptr:#x}, memory {size} bytes)",
                    stage=self.name,
                    code="alloc",
                )
            _memmove(base + ptr, data, len(data))
            what = "ep_process"
            if tm is None:
                r = self._f_process(n)
            else:
                t0 = time.perf_counter()
                try:
                    r = self._f_process(n)
                finally:
                    tm.guest_s += time.perf_counter() - t0
        except (wasmtime.Trap, wasmtime.WasmtimeError, HostTrap) as e:
            raise self._error(e, what) from None
        finally:
            TICKER.exit()
        raw = self._output(r, "ep_process", n)
        kind = self.kind
        check = self._check
        if kind == "filter":
            if not check.is_subsequence(raw, data):
                raise FilterRuntimeError(
                    "a filter stage may only drop records, not change or reorder them",
                    stage=self.name,
                    code="kind_violation",
                )
            return raw
        if kind == "map":
            bad = check.map_output(raw, data)
            if bad == KEYS_CHANGED:
                raise FilterRuntimeError(
                    "a map stage must return the same records (count, series, ts) in order",
                    stage=self.name,
                    code="kind_violation",
                )
        else:
            bad = check.new_output(raw, data, len(self.registry))
            if bad == UNKNOWN_SERIES:
                self._unknown_series(raw)
        if bad >= 0:
            self._bad_value(raw, bad)
        return raw

    def _unknown_series(self, raw: bytes) -> None:
        raise FilterRuntimeError(
            f"output refers to unknown series id {self._check.max_series(raw)}",
            stage=self.name,
            code="unknown_series",
        )

    def _bad_value(self, raw: bytes, bad: int) -> None:
        ts, value = _TS_VALUE.unpack_from(raw, bad * REC)
        raise FilterRuntimeError(
            f"output record {bad} is out of range (ts {ts}, value {value!r}): "
            "values must be finite, within +-1e250, and timestamps in 2000..2100",
            stage=self.name,
            code="bad_value",
        )

    def process(self, batch: Batch) -> Batch:
        """:meth:`process_raw` for a :class:`Batch`."""
        return unpack(self.process_raw(batch.pack(), len(batch)))

    def flush_raw(self) -> bytes:
        if not self.has_flush:
            return b""
        r = self._call(self._f_flush, "ep_flush")
        raw = self._output(r, "ep_flush", self._max_output)
        if raw and self._check.max_series(raw) >= len(self.registry):
            self._unknown_series(raw)
        return raw

    def flush(self) -> Batch:
        return unpack(self.flush_raw())

    def snapshot(self) -> bytes:
        """The guest's state blob (``b""`` for none or a stateless module)."""
        if not self.stateful:
            return b""
        r = self._call(self._f_snapshot, "ep_snapshot")
        ptr, n = _u32(r >> 32), r & 0xFFFFFFFF
        if r == 0 or n == 0:
            self._mem.span()  # what the snapshot grew, for grown() (a read looks itself)
            return b""
        if n > self._mem_cap:
            raise FilterRuntimeError(
                f"ep_snapshot returned {n} bytes", stage=self.name, code="output_count"
            )
        try:
            return self._mem.read(ptr, n)
        except HostTrap as e:
            raise FilterRuntimeError(
                f"ep_snapshot: {e}", stage=self.name, code="output_pointer"
            ) from None

    def restore(self, blob: bytes) -> None:
        if not blob:
            return
        if "ep_restore" not in self.loaded.exports:
            raise FilterRuntimeError(
                "state given to a module without ep_restore", stage=self.name, code="restore"
            )
        ptr = _u32(self._call(self._f_alloc, "ep_alloc", len(blob)))
        self._guarded_write(ptr, blob, "ep_alloc")
        rc = self._call(self._f_restore, "ep_restore", ptr, len(blob), arm=False)
        if rc != 0:
            raise FilterRuntimeError(
                f"ep_restore rejected the state blob ({len(blob)} bytes, returned {rc})",
                stage=self.name,
                code="restore",
            )
