"""The process-wide wasmtime engine and the epoch ticker that drives call deadlines."""

from __future__ import annotations

import platform
import threading
import time

import wasmtime

from ._abi import ABI_VERSION

__all__ = ["MAX_STACK", "TICK_S", "TICKER", "engine", "engine_settings"]

TICK_S = 0.002  # epoch ticker period
MAX_STACK = 512 * 1024

_engine: wasmtime.Engine | None = None
_engine_lock = threading.Lock()


def engine_settings() -> str:
    """Everything that makes compiled code incompatible: part of the AOT cache key."""
    return f"abi{ABI_VERSION};fuel;epoch;opt=speed;stack={MAX_STACK};fixed;{platform.machine()}"


def engine() -> wasmtime.Engine:
    """The process-wide engine (fuel and epoch interruption on).  Its linear memories
    never move (``memory_may_move`` off: each is a fixed reservation, Wasmtime's default
    layout on 64-bit hosts, made a guarantee), so the host may keep a memory's address
    across guest calls and use the size it last saw as a lower bound (memories never
    shrink)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            cfg = wasmtime.Config()
            cfg.consume_fuel = True
            cfg.epoch_interruption = True
            cfg.cranelift_opt_level = "speed"
            cfg.max_wasm_stack = MAX_STACK
            cfg.wasm_threads = False
            cfg.memory_may_move = False
            _engine = wasmtime.Engine(cfg)
        return _engine


class Ticker:
    """Advances the engine epoch every ``TICK_S`` while any guest call is running.

    Idle (no guest call in flight) it blocks on an event, so an idle edge process pays
    nothing.  The calls in flight are the items of a list (``list.append`` and
    ``list.pop`` are atomic in CPython: no lock on a guest call's path, where two lock
    round trips cost more than the guest call's own bookkeeping); ``enter`` only signals
    when the thread is parked, and the thread re-checks the list after clearing
    ``_running`` so a concurrent ``enter`` is never missed.
    ``ticks`` counts epoch increments and ``parks`` the times the thread went idle
    (:meth:`wait_parked` waits for the next one).
    """

    def __init__(self) -> None:
        self._calls: list[None] = []  # one item per guest call in flight
        self._lock = threading.Lock()  # starts the thread once
        self._wake = threading.Event()
        self._running = False
        self._thread: threading.Thread | None = None
        self._parked = threading.Condition()
        self.parked = False  # the thread waits for a guest call: it does not tick
        self.parks = 0
        self.ticks = 0

    def wait_parked(self, since: int, timeout: float | None = None) -> bool:
        """Until the thread has parked again after ``parks`` was ``since``; False on
        timeout."""
        with self._parked:
            return self._parked.wait_for(lambda: self.parks > since, timeout)

    def enter(self) -> None:
        self._calls.append(None)
        if not self._running:
            if self._thread is None:
                self._start()
            self._wake.set()

    def exit(self) -> None:
        self._calls.pop()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="edgepipe-epoch", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        eng = engine()
        sleep = time.sleep
        while True:
            self._running = True
            calls = self._calls
            while calls:
                sleep(TICK_S)
                eng.increment_epoch()
                self.ticks += 1
            self._running = False
            if calls:
                continue
            with self._parked:
                self.parks += 1
                self.parked = True
                self._parked.notify_all()
            self._wake.wait()
            self.parked = False
            self._wake.clear()


#: the one ticker of the process (its engine is :func:`engine`)
TICKER = Ticker()
