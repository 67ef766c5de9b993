"""The host functions a guest imports (module ``edgepipe``, ABI v1): a stage's only way
out of its sandbox.  Each turns its own failures into a trap of the calling guest."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import wasmtime

from ..wasm._ffi import HostTrap
from ._engine import engine

if TYPE_CHECKING:
    from ..wasm._ffi import GuestMemory
    from ._stage import WasmStage

__all__ = ["MAX_DERIVED_SERIES", "make_linker"]

log = logging.getLogger("edgepipe.filter")

#: Series one stage may create with ``series_derive`` (a guest cannot grow the registry,
#: and with it every metric label, without bound).
MAX_DERIVED_SERIES = 4096


def _u32(x: int) -> int:
    return x & 0xFFFFFFFF


def make_linker(stage: WasmStage) -> wasmtime.Linker:
    """The three ``edgepipe`` imports a guest may use, bound to ``stage``: ``series_name``,
    ``series_derive`` (bounded per stage) and ``log`` (rate-limited, cut to 1 KiB)."""
    linker = wasmtime.Linker(engine())
    i32 = wasmtime.ValType.i32()
    registry = stage.registry

    def series_name(series: int, kind: int, ptr: int, length: int) -> int:
        try:
            return _series_name(series, kind, ptr, length)
        except HostTrap:
            raise
        except Exception as e:  # a host bug must trap the call, not escape it
            raise HostTrap("host_error", f"series_name: {type(e).__name__}") from None

    def memory() -> GuestMemory:
        """The instance's memory; a trap while there is none (a start function runs
        before the instance, and so its memory, is there for the host)."""
        mem = stage._mem
        if mem is None:
            raise HostTrap("no_memory", "host function called before the instance had its memory")
        return mem

    def _series_name(series: int, kind: int, ptr: int, length: int) -> int:
        key = registry.get(_u32(series))
        if key is None or kind not in (0, 1):
            return -1
        data = (key.device if kind == 0 else key.metric).encode()
        n = min(len(data), _u32(length))
        if n:
            memory().write(_u32(ptr), data[:n])
        return len(data)

    def series_derive(series: int, ptr: int, length: int) -> int:
        sid, length = _u32(series), _u32(length)
        if registry.get(sid) is None:
            raise HostTrap("unknown_series", f"series_derive: unknown series id {sid}")
        if not 0 < length <= 64:
            raise HostTrap("bad_argument", "series_derive: suffix must be 1-64 bytes")
        raw = memory().read(_u32(ptr), length)
        try:
            suffix = raw.decode()
        except UnicodeDecodeError:
            raise HostTrap("bad_argument", "series_derive: suffix is not UTF-8") from None
        before = len(registry)
        try:
            new = registry.derive(sid, suffix)
        except Exception as e:
            raise HostTrap("host_error", f"series_derive: {type(e).__name__}") from None
        if len(registry) > before:
            stage.derived += 1
            if stage.derived > MAX_DERIVED_SERIES:
                raise HostTrap(
                    "series_limit",
                    f"series_derive: a stage may create at most {MAX_DERIVED_SERIES} series",
                )
        return new

    def guest_log(level: int, ptr: int, length: int) -> None:
        try:
            _guest_log(level, ptr, length)
        except HostTrap:
            raise
        except Exception as e:  # a host bug must trap the call, not escape it
            raise HostTrap("host_error", f"log: {type(e).__name__}") from None

    def _guest_log(level: int, ptr: int, length: int) -> None:
        now = time.monotonic()
        stage._log_tokens = min(20.0, stage._log_tokens + (now - stage._log_at) * 10)
        stage._log_at = now
        if stage._log_tokens < 1:
            return
        stage._log_tokens -= 1
        text = memory().read(_u32(ptr), min(_u32(length), 1024)).decode(errors="replace")
        stage._last_log = text[:200]
        lvl = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING}.get(level, logging.ERROR)
        log.log(lvl, "stage %s: %s", stage.name, text)

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, its calls counted and timed while the stage is measured."""

        def call(*args: int) -> Any:
            tm = stage.timing
            if tm is None:
                return fn(*args)
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                tm.host_call_s += time.perf_counter() - t
                tm.host_calls += 1

        return call

    linker.define_func(
        "edgepipe", "series_name", wasmtime.FuncType([i32] * 4, [i32]), timed(series_name)
    )
    linker.define_func(
        "edgepipe", "series_derive", wasmtime.FuncType([i32] * 3, [i32]), timed(series_derive)
    )
    linker.define_func("edgepipe", "log", wasmtime.FuncType([i32] * 3, []), timed(guest_log))
    return linker
