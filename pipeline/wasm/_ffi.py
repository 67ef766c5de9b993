"""The wasmtime C API fast path: the only module that touches wasmtime-py's private
``_bindings`` / ``_ffi`` and ctypes.

wasmtime-py boxes every argument and result and looks up the function type on every
call, and copies linear memory through Python objects.  A stage calls its guest a few
times per *batch*, but with 24 bytes per record the copies matter; this module offers
the few operations a stage needs, each a single Python call over C:

- :class:`GuestCall`: call one export with up to three i32 arguments, get its i32 or i64
  result (``wasmtime_func_call_unchecked``; safe because every export's signature was
  checked against the ABI when the module was loaded);
- :class:`GuestMemory`: the host address and size of the linear memory, and bounds-checked
  ``read`` / ``write`` of bytes at a guest pointer (``ctypes.memmove``);
- :class:`Budget`: a fresh fuel budget and epoch deadline for the store;
- :class:`HostTrap`: raised by host code (or a bounds check) to trap the guest.

Python exceptions raised inside host functions during a call are re-raised by
:class:`GuestCall` as they are (wasmtime keeps them aside while the trap unwinds).
"""

from __future__ import annotations

import ctypes

import wasmtime
from wasmtime import _bindings as _capi
from wasmtime import _ffi as ffi

__all__ = ["Budget", "GuestCall", "GuestMemory", "HostTrap", "host_engine", "memmove", "string_at"]

_void_p, _size_t, _u64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64
_byref, _addressof = ctypes.byref, ctypes.addressof
#: the same library, its functions called without releasing the GIL (``ctypes.PyDLL``)
_held = ctypes.PyDLL(ffi.dll._name)


def _raw(name: str, restype: object, *, hold: bool = False) -> ctypes._CFuncPtr:
    """A private handle on a C API function taking plain addresses, given as ctypes
    instances (``c_void_p``, ``c_size_t``, ``c_uint64``) that the caller made once: with
    no ``argtypes``, ctypes passes an instance as it is, with no conversion per call (a
    tenth of a call's cost, against converting Python ints; wasmtime-py's typed-pointer
    checks cost several times that).  A plain Python int would be passed as a C ``int``,
    so none is ever given: every call is in this module.

    ``hold``: called holding the GIL, for functions that run no guest code and return at
    once (releasing and retaking the GIL costs more than they do: 450 against 210 ns a
    call).  A guest call must release it: the epoch ticker thread needs it to interrupt
    a guest that overruns its deadline."""
    fn = (_held if hold else ffi.dll)[name]  # a new function object, not wasmtime-py's own
    fn.argtypes, fn.restype = None, restype
    return fn


# (context, func, args_and_results, nargs_and_results, trap_ret) -> error
_func_call = _raw("wasmtime_func_call_unchecked", _void_p)
_func_call_held = _raw("wasmtime_func_call_unchecked", _void_p, hold=True)  # the host's kernels
# (context, memory)
_mem_data = _raw("wasmtime_memory_data", _void_p, hold=True)
_mem_size = _raw("wasmtime_memory_data_size", _size_t, hold=True)
# (context, u64) -> error / nothing
_set_fuel = _raw("wasmtime_context_set_fuel", _void_p, hold=True)
_set_deadline = _raw("wasmtime_context_set_epoch_deadline", None, hold=True)
#: ``memmove`` holding the GIL (ctypes' own releases it); ``string_at`` already does
memmove = ctypes.PYFUNCTYPE(_void_p, _void_p, _void_p, _size_t)(ctypes._memmove_addr)
string_at = ctypes.string_at
_memmove, _string_at = memmove, string_at
_TrapPtr = ctypes.POINTER(ffi.wasm_trap_t)


def _context(store: wasmtime.Store) -> int:
    return ctypes.cast(store._context(), _void_p).value or 0


_raise_last = wasmtime._func.maybe_raise_last_exn
_UNLIMITED_FUEL = 2**63 - 1


def host_engine() -> wasmtime.Engine:
    """An engine for the host's own kernels: optimised for speed, without fuel or epoch
    interruption (the guests' engine instruments every loop with both; a kernel is linear
    in its input and runs a third faster without them)."""
    cfg = wasmtime.Config()
    cfg.cranelift_opt_level = "speed"
    cfg.wasm_threads = False
    return wasmtime.Engine(cfg)


class HostTrap(Exception):
    """Raised by a host function (or a bounds check) to trap the guest with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class GuestCall:
    """Calls one export of an instance in ``store``: ``call(a, b, c)`` with ``nparams`` (0-3)
    i32 arguments; returns the i64 result if ``i64`` else the i32 one.  Raises
    :class:`wasmtime.Trap`, :class:`wasmtime.WasmtimeError` or whatever a host function
    raised.  ``trusted``: the host's own code (the check kernel), which runs without a
    deadline and so is called holding the GIL."""

    __slots__ = ("_keep", "_args", "_vals", "_trap", "_i64", "_call")

    def __init__(
        self,
        store: wasmtime.Store,
        func: wasmtime.Func,
        nparams: int,
        i64: bool,
        *,
        trusted: bool = False,
    ):
        size = max(nparams, 1)
        self._vals = (_capi.wasmtime_val_raw_t * size)()
        self._trap = _void_p()
        self._keep = (store, func)  # the addresses below live as long as these do
        self._args = (
            _void_p(_context(store)),
            _void_p(_addressof(func._func)),
            _void_p(_addressof(self._vals)),
            _size_t(size),
            _void_p(_addressof(self._trap)),
        )
        self._i64 = i64
        # the host's own code, which needs no deadline, is called holding the GIL
        self._call = _func_call_held if trusted else _func_call

    def __call__(self, a: int | None = None, b: int | None = None, c: int | None = None) -> int:
        vals = self._vals
        if a is not None:
            vals[0].i32 = a
            if b is not None:
                vals[1].i32 = b
                if c is not None:
                    vals[2].i32 = c
        err = self._call(*self._args)
        if err or self._trap.value:
            self._raise(err)
        return vals[0].i64 if self._i64 else vals[0].i32

    def _raise(self, err: int | None) -> None:
        if err:
            exc: Exception = wasmtime.WasmtimeError._from_ptr(
                ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t))
            )
        else:
            exc = wasmtime.Trap._from_ptr(ctypes.cast(self._trap.value, _TrapPtr))
            self._trap.value = None
        _raise_last()
        raise exc


class GuestMemory:
    """The linear memory ``memory`` of an instance in ``store``.  Its host address can
    change whenever the guest grows it, so every operation looks its size up afresh --
    and its address only when the size changed (a memory moves only when it grows, and
    never shrinks): one C call per operation instead of two.  ``base`` and ``size`` are
    the host address and byte length as of the last look (:meth:`span`, :meth:`write`,
    a :meth:`read` that is not empty): the memory as it is now when no guest code ran
    since, and a lower bound of its size (with, in an engine whose memories never move,
    its address) whatever ran."""

    __slots__ = ("_args", "memory", "_store", "base", "size")

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        self._store = store
        self.memory = memory
        self._args = (_void_p(_context(store)), _void_p(_addressof(memory._memory)))
        self.base, self.size = _mem_data(*self._args) or 0, -1

    def span(self) -> tuple[int, int]:
        """(host address, byte length) of the linear memory right now."""
        size = _mem_size(*self._args)
        if size != self.size:
            self.base, self.size = _mem_data(*self._args) or 0, size
        return self.base, size

    def _address(self, ptr: int, length: int) -> int:
        base, size = self.span()
        if ptr < 0 or ptr + length > size:
            raise HostTrap(
                "out_of_bounds", f"guest range [{ptr}, {ptr + length}) is outside its memory"
            )
        return base + ptr

    def read(self, ptr: int, length: int) -> bytes:
        """The ``length`` bytes at guest ``ptr``; :class:`HostTrap` ``out_of_bounds``."""
        return _string_at(self._address(ptr, length), length) if length else b""

    def write(self, ptr: int, data: bytes) -> None:
        """Copy ``data`` to guest ``ptr``; :class:`HostTrap` ``out_of_bounds``."""
        _memmove(self._address(ptr, len(data)), data, len(data))


class Budget:
    """Fuel (``None``: unlimited) and an epoch deadline (``ticks`` from now) for every
    guest operation in ``store``: :meth:`arm` grants a fresh budget of both,
    :meth:`refuel` only fresh fuel (when the epoch has not moved since the last
    :meth:`arm`, the deadline it set is still ``ticks`` away)."""

    __slots__ = ("_fuel", "_ticks")

    def __init__(self, store: wasmtime.Store, fuel: int | None, ticks: int) -> None:
        # the address only: holding the store would keep a dropped instance's memory
        # alive; its owner arms it only while it has the store
        ctx = _void_p(_context(store))
        self._fuel = (ctx, _u64(fuel if fuel is not None else _UNLIMITED_FUEL))
        self._ticks = (ctx, _u64(ticks))

    def refuel(self) -> None:
        err = _set_fuel(*self._fuel)
        if err:  # frees it; fuel is always enabled
            wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t)))

    def arm(self) -> None:
        self.refuel()
        _set_deadline(*self._ticks)
