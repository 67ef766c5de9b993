"""The checks of a stage's output records, one call per batch at machine speed.

A guest's output is untrusted: a ``filter`` stage may only drop records (its output must
be a subsequence of its input, byte for byte), a ``map`` stage must keep every record's
timestamp and series id in order, and every other kind may only name series ids the
registry knows; and every kind but ``filter`` (whose output is its own input) must keep
values finite and within +-1e250 and timestamps within 2000..2100 (or the input's own
range), what the edge's decoder and the receiver accept: else its output would be stored
and then refused by the receiver for ever.  Done in Python these cost a loop per record;
here they run in a tiny *host-owned* WebAssembly module (written below in WAT, loaded
from the AOT cache or compiled, once per process) in a store of its own: the records are
copied into its memory with one ``memmove`` each and checked by one call.  The module is
the host's own code, so it runs in an engine of its own without fuel or a deadline (it is
linear in the records and cannot loop), and is called holding the GIL.

One instance serves a whole chain (every stage's checks and the ``match:`` split of the
batch between stages), made when the chain is built.

Memory layout of a check: the input records at 0, the output records right after them;
of a split: the records at 0, the selected ones at ``n*24``, the others at ``2*n*24``, the
selection table at ``3*n*24``.
"""

from __future__ import annotations

import hashlib
import platform
import threading

import wasmtime

from ..wasm._aot import ModuleCache
from ..wasm._ffi import GuestCall, GuestMemory, host_engine
from ..wasm._ffi import memmove as _memmove
from ..wasm._ffi import string_at as _string_at

__all__ = ["KEYS_CHANGED", "UNKNOWN_SERIES", "OutputCheck"]

REC = 24
_PAGE = 65536

_WAT = """
(module
  (memory (export "memory") 1)
  ;; 1 if the n_out records after the n_in input records at 0 are a subsequence of them
  (func (export "subseq") (param $n_in i32) (param $n_out i32) (result i32)
    (local $i i32) (local $ie i32) (local $o i32) (local $oe i32)
    (local.set $ie (i32.mul (local.get $n_in) (i32.const 24)))
    (local.set $o (local.get $ie))
    (local.set $oe (i32.add (local.get $ie) (i32.mul (local.get $n_out) (i32.const 24))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $o) (local.get $oe)))
        (block $found
          (loop $scan
            ;; fewer input records left than output records: cannot match
            (if (i32.gt_u (i32.sub (local.get $oe) (local.get $o))
                          (i32.sub (local.get $ie) (local.get $i)))
              (then (return (i32.const 0))))
            (if (i64.eq (i64.load (local.get $i)) (i64.load (local.get $o)))
              (then
                (if (i64.eq (i64.load offset=8 (local.get $i)) (i64.load offset=8 (local.get $o)))
                  (then
                    (if (i64.eq (i64.load offset=16 (local.get $i))
                                (i64.load offset=16 (local.get $o)))
                      (then
                        (local.set $i (i32.add (local.get $i) (i32.const 24)))
                        (br $found)))))))
            (local.set $i (i32.add (local.get $i) (i32.const 24)))
            (br $scan)))
        (local.set $o (i32.add (local.get $o) (i32.const 24)))
        (br $next)))
    (i32.const 1))
  ;; 1 if the n output records keep the timestamp and series id of the n input records
  (func $same_keys (export "same_keys") (param $n i32) (result i32)
    (local $i i32) (local $o i32) (local $ie i32)
    (local.set $ie (i32.mul (local.get $n) (i32.const 24)))
    (local.set $o (local.get $ie))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $ie)))
        (if (i64.ne (i64.load (local.get $i)) (i64.load (local.get $o)))
          (then (return (i32.const 0))))
        (if (i32.ne (i32.load offset=16 (local.get $i)) (i32.load offset=16 (local.get $o)))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 24)))
        (local.set $o (i32.add (local.get $o) (i32.const 24)))
        (br $next)))
    (i32.const 1))
  ;; the index of the first of the n_out output records (after the n_in input records at
  ;; 0) whose timestamp is outside [2000-01-01, 2100-01-01) widened to the input's own
  ;; range, or whose value is not finite or beyond +-1e250 (unless an input value already
  ;; was: a stage is never failed for what it was given); -1 if none
  (func $bad_record (export "bad_record") (param $n_in i32) (param $n_out i32) (result i32)
    (local $p i32) (local $ie i32) (local $e i32) (local $ts i64) (local $lo i64) (local $hi i64)
    (local $clean i32)
    (local.set $clean (i32.const 1))
    (local.set $lo (i64.const 946684800000))
    (local.set $hi (i64.const 4102444799999))
    (local.set $ie (i32.mul (local.get $n_in) (i32.const 24)))
    (block $widened
      (loop $in
        (br_if $widened (i32.ge_u (local.get $p) (local.get $ie)))
        (local.set $ts (i64.load (local.get $p)))
        (if (i64.lt_s (local.get $ts) (local.get $lo)) (then (local.set $lo (local.get $ts))))
        (if (i64.gt_s (local.get $ts) (local.get $hi)) (then (local.set $hi (local.get $ts))))
        (if (i32.eqz (f64.le (f64.abs (f64.load offset=8 (local.get $p))) (f64.const 1e250)))
          (then (local.set $clean (i32.const 0))))
        (local.set $p (i32.add (local.get $p) (i32.const 24)))
        (br $in)))
    (local.set $e (i32.add (local.get $ie) (i32.mul (local.get $n_out) (i32.const 24))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $p) (local.get $e)))
        (local.set $ts (i64.load (local.get $p)))
        (if (i32.or (i64.lt_s (local.get $ts) (local.get $lo))
                    (i64.gt_s (local.get $ts) (local.get $hi)))
          (then (return (i32.div_u (i32.sub (local.get $p) (local.get $ie)) (i32.const 24)))))
        ;; f64.le is false for NaN, and +-inf is beyond the bound
        (if (i32.and (local.get $clean)
                     (i32.eqz (f64.le (f64.abs (f64.load offset=8 (local.get $p)))
                                      (f64.const 1e250))))
          (then (return (i32.div_u (i32.sub (local.get $p) (local.get $ie)) (i32.const 24)))))
        (local.set $p (i32.add (local.get $p) (i32.const 24)))
        (br $next)))
    (i32.const -1))
  ;; a stage's match: the n records at 0 partitioned, each part in order, by the byte
  ;; table of tn entries at 3*n*24 indexed by series id (an id past its end: 0): those
  ;; whose entry is not 0 to n*24 on, the others to 2*n*24 on; the number of the former
  (func (export "split") (param $n i32) (param $tn i32) (result i32)
    (local $p i32) (local $e i32) (local $t i32) (local $a i32) (local $b i32)
    (local $s i32) (local $d i32)
    (local.set $e (i32.mul (local.get $n) (i32.const 24)))
    (local.set $a (local.get $e))
    (local.set $b (i32.shl (local.get $e) (i32.const 1)))
    (local.set $t (i32.add (local.get $b) (local.get $e)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $p) (local.get $e)))
        (local.set $s (i32.load offset=16 (local.get $p)))
        (local.set $d (local.get $b))
        (if (i32.lt_u (local.get $s) (local.get $tn))
          (then
            (if (i32.load8_u (i32.add (local.get $t) (local.get $s)))
              (then (local.set $d (local.get $a))))))
        (i64.store (local.get $d) (i64.load (local.get $p)))
        (i64.store offset=8 (local.get $d) (i64.load offset=8 (local.get $p)))
        (i64.store offset=16 (local.get $d) (i64.load offset=16 (local.get $p)))
        (if (i32.eq (local.get $d) (local.get $a))
          (then (local.set $a (i32.add (local.get $a) (i32.const 24))))
          (else (local.set $b (i32.add (local.get $b) (i32.const 24)))))
        (local.set $p (i32.add (local.get $p) (i32.const 24)))
        (br $next)))
    (i32.div_u (i32.sub (local.get $a) (local.get $e)) (i32.const 24)))
  ;; the largest series id (unsigned) of the n records at 0; 0 when n is 0
  (func (export "max_series") (param $n i32) (result i32)
    (call $max_at (i32.const 0) (local.get $n)))
  ;; a map stage's output (n records after the n input records): -2 if a timestamp or
  ;; series id changed, else what bad_record says
  (func (export "check_map") (param $n i32) (result i32)
    (if (i32.eqz (call $same_keys (local.get $n))) (then (return (i32.const -2))))
    (call $bad_record (local.get $n) (local.get $n)))
  ;; the output of a stage that makes records (n_out after the n_in input records): -2 if
  ;; a series id is ns or beyond (unknown to the registry), else what bad_record says
  (func (export "check_new") (param $n_in i32) (param $n_out i32) (param $ns i32) (result i32)
    (if (i32.and (i32.ne (local.get $n_out) (i32.const 0))
                 (i32.ge_u (call $max_at (i32.mul (local.get $n_in) (i32.const 24))
                                         (local.get $n_out))
                           (local.get $ns)))
      (then (return (i32.const -2))))
    (call $bad_record (local.get $n_in) (local.get $n_out)))
  ;; the largest series id (unsigned) of the n records at byte p; 0 when n is 0
  (func $max_at (param $p i32) (param $n i32) (result i32)
    (local $e i32) (local $m i32) (local $s i32)
    (local.set $e (i32.add (local.get $p) (i32.mul (local.get $n) (i32.const 24))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $p) (local.get $e)))
        (local.set $s (i32.load offset=16 (local.get $p)))
        (if (i32.gt_u (local.get $s) (local.get $m)) (then (local.set $m (local.get $s))))
        (local.set $p (i32.add (local.get $p) (i32.const 24)))
        (br $next)))
    (local.get $m))
)
"""

_module: list[tuple[wasmtime.Engine, wasmtime.Module]] = []
_lock = threading.Lock()
#: what the cache keys the compiled module by (it is compiled from the WAT text)
_SHA256 = "edgepipe-check:" + hashlib.sha256(_WAT.encode()).hexdigest()
#: its engine's settings (part of the AOT cache key, like a stage's)
_SETTINGS = f"check;opt=speed;{platform.machine()}"
#: check memory kept between batches; a batch that grew it beyond this drops the instance
#: afterwards, so the memory returns to the system (a fresh one is made on the next call)
KEEP_BYTES = 1024 * 1024
#: what map_output / new_output return for a change of keys / an unknown series id
KEYS_CHANGED, UNKNOWN_SERIES = -2, -2


def _compiled(cache: ModuleCache | None) -> tuple[wasmtime.Engine, wasmtime.Module]:
    """The module, compiled once per process -- through the AOT cache when there is one:
    compiling (Cranelift) costs a process that otherwise only loads cached modules about
    6 MB of resident code and heap, for the life of the process.

    It runs in an engine of its own without fuel or epoch interruption (the guests'
    engine instruments every loop with both): the kernel is the host's own code, linear
    in the records, and runs a third faster without them."""
    if not _module:
        with _lock:
            if not _module:
                eng = host_engine()
                if cache is None or cache.directory is None:
                    _module.append((eng, wasmtime.Module(eng, _WAT)))
                else:
                    own = ModuleCache(cache.directory, eng, _SETTINGS, cache.target)
                    _module.append((eng, own.load(_WAT.encode(), _SHA256)))
                    cache.hits, cache.misses = cache.hits + own.hits, cache.misses + own.misses
    return _module[0]


class OutputCheck:
    """The check kernel of a chain: one instance (store and memory) shared by the chain's
    stages and its ``match:`` split.  Not thread-safe, like the chain.  The instance is
    made on first use; ``cache`` is the AOT cache its module is loaded through."""

    __slots__ = (
        "_cache",
        "_store",
        "_mem",
        "_memory",
        "_subseq",
        "_same",
        "_max",
        "_bad",
        "_split",
        "_map",
        "_new",
        "_base",
        "_size",
        "instances",
    )

    def __init__(self, cache: ModuleCache | None = None) -> None:
        self._cache = cache
        self._store: wasmtime.Store | None = None
        self._base = self._size = 0
        self.instances = 0

    def _instantiate(self) -> None:
        eng, module = _compiled(self._cache)
        store = wasmtime.Store(eng)
        inst = wasmtime.Instance(store, module, [])
        ex = inst.exports(store)
        self._store = store
        self._memory = ex["memory"]
        self._mem = GuestMemory(store, self._memory)
        self._subseq = GuestCall(store, ex["subseq"], 2, False, trusted=True)
        self._same = GuestCall(store, ex["same_keys"], 1, False, trusted=True)
        self._max = GuestCall(store, ex["max_series"], 1, False, trusted=True)
        self._bad = GuestCall(store, ex["bad_record"], 2, False, trusted=True)
        self._split = GuestCall(store, ex["split"], 2, False, trusted=True)
        self._map = GuestCall(store, ex["check_map"], 1, False, trusted=True)
        self._new = GuestCall(store, ex["check_new"], 3, False, trusted=True)
        # the module never grows its memory, so its address only changes in _reserve
        self._base, self._size = self._mem.span()
        self.instances += 1

    def ready(self) -> None:
        """Make the instance now (a chain does when it is built, so that its first batch
        does not pay for loading -- or, without an AOT cache, compiling -- the module)."""
        if self._store is None:
            self._instantiate()

    def _reserve(self, need: int) -> int:
        """The memory's host address, with at least ``need`` bytes."""
        if self._store is None:
            self._instantiate()
        if need > self._size:
            self._memory.grow(self._store, (need - self._size + _PAGE - 1) // _PAGE)
            self._base, self._size = self._mem.span()
        return self._base

    def _load(self, first: bytes, second: bytes = b"") -> None:
        base = self._reserve(len(first) + len(second))
        _memmove(base, first, len(first))
        if second:
            _memmove(base + len(first), second, len(second))

    def _done(self) -> None:
        """After a call: let a memory that one large batch grew go."""
        if self._size > KEEP_BYTES:
            self.close()

    def close(self) -> None:
        """Free the instance and its memory (idempotent; the next check makes a new one)."""
        self._store = None
        self._mem = self._memory = None  # type: ignore[assignment]
        self._subseq = self._same = self._max = self._bad = None  # type: ignore[assignment]
        self._split = self._map = self._new = None  # type: ignore[assignment]
        self._base = self._size = 0

    def memory_bytes(self) -> int:
        return self._size

    def is_subsequence(self, out: bytes, inp: bytes) -> bool:
        """Are ``out``'s records a subsequence of ``inp``'s (same bytes, same order)?"""
        if out == inp or not out:
            return True
        if len(out) > len(inp):
            return False
        self._load(inp, out)
        ok = self._subseq(len(inp) // REC, len(out) // REC) == 1
        self._done()
        return ok

    def same_keys(self, out: bytes, inp: bytes) -> bool:
        """Same count, and each record's timestamp and series id unchanged, in order?"""
        if len(out) != len(inp):
            return False
        if out == inp or not out:
            return True
        self._load(inp, out)
        ok = self._same(len(inp) // REC) == 1
        self._done()
        return ok

    def bad_record(self, out: bytes, inp: bytes) -> int:
        """The index of the first output record whose value is not finite or beyond +-1e250,
        or whose timestamp leaves 2000..2100 (what the edge's decoder and the receiver accept;
        widened to the input's own timestamps, and values unchecked when an input value was
        already out of range, so a stage never fails for what it was given), else -1."""
        if not out:
            return -1
        self._load(inp, out)
        return self._result(self._bad(len(inp) // REC, len(out) // REC))

    def map_output(self, out: bytes, inp: bytes) -> int:
        """A map stage's output in one call: :data:`KEYS_CHANGED` unless it keeps the
        count, timestamps and series ids of ``inp`` in order, else :meth:`bad_record`."""
        if len(out) != len(inp):
            return KEYS_CHANGED
        if out == inp or not out:
            # its own input: nothing changed that could fail (see bad_record)
            return -1
        self._load(inp, out)
        return self._result(self._map(len(inp) // REC))

    def new_output(self, out: bytes, inp: bytes, known: int) -> int:
        """The output of a stage that makes records, in one call: :data:`UNKNOWN_SERIES`
        if a series id is ``known`` or beyond, else :meth:`bad_record`."""
        if not out:
            return -1
        self._load(inp, out)
        return self._result(self._new(len(inp) // REC, len(out) // REC, known))

    def _result(self, r: int) -> int:
        self._done()
        return r if r < 0x80000000 else r - 0x100000000

    def max_series(self, raw: bytes) -> int:
        """The largest series id in ``raw`` (-1 when empty)."""
        if not raw:
            return -1
        self._load(raw)
        top = self._max(len(raw) // REC) & 0xFFFFFFFF
        self._done()
        return top

    def split(self, raw: bytes, table: bytes) -> tuple[bytes, bytes]:
        """``raw``'s records in two parts, each in order: those whose series id has a
        non-zero byte in ``table`` (indexed by series id; an id past its end selects
        nothing), and the others.  The whole of ``raw`` when it is all one part."""
        if not raw:
            return b"", b""
        n = len(raw) // REC
        size = n * REC
        base = self._reserve(3 * size + len(table))
        _memmove(base, raw, size)
        _memmove(base + 3 * size, table, len(table))
        k = self._split(n, len(table))
        if k == n:
            hit, rest = raw, b""
        elif k == 0:
            hit, rest = b"", raw
        else:
            hit = _string_at(base + size, k * REC)
            rest = _string_at(base + 2 * size, size - k * REC)
        self._done()
        return hit, rest
