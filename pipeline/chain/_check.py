"""The checks of a stage's output records, one call per batch at machine speed.

A guest's output is untrusted: a ``filter`` stage may only drop records (its output must
be a subsequence of its input, byte for byte), a ``map`` stage must keep every record's
timestamp and series id in order, and every other kind may only name series ids the
registry knows; and every kind but ``filter`` (whose output is its own input) must keep
values finite and within +-1e250 and timestamps within 2000..2100 (or the input's own
range), what the edge's decoder and the receiver accept: else its output would be stored
and then refused by the receiver for ever.  Done in Python these cost a loop per record; here they run in a tiny
*host-owned* WebAssembly module (written below in WAT, compiled once per process) in a
store of its own: the records are copied into its memory with one ``memmove`` each and
checked by one call.  The module is the host's own code, so it runs without fuel or a
deadline worth speaking of (it is linear in the records and cannot loop).

Memory layout of a check: the input records at 0, the output records right after them.
"""

from __future__ import annotations

import threading
from ctypes import memmove as _memmove

import wasmtime

from ._engine import engine
from ._ffi import Budget, GuestCall, GuestMemory

__all__ = ["OutputCheck"]

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
  (func (export "same_keys") (param $n i32) (result i32)
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
  (func (export "bad_record") (param $n_in i32) (param $n_out i32) (result i32)
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
  ;; the largest series id (unsigned) of the n records at 0; 0 when n is 0
  (func (export "max_series") (param $n i32) (result i32)
    (local $p i32) (local $e i32) (local $m i32) (local $s i32)
    (local.set $e (i32.mul (local.get $n) (i32.const 24)))
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

_module: list[wasmtime.Module] = []
_lock = threading.Lock()


def _compiled() -> wasmtime.Module:
    if not _module:
        with _lock:
            if not _module:
                _module.append(wasmtime.Module(engine(), _WAT))
    return _module[0]


class OutputCheck:
    """One checker instance (a stage owns one; not thread-safe, like the stage)."""

    __slots__ = (
        "_store",
        "_mem",
        "_memory",
        "_subseq",
        "_same",
        "_max",
        "_bad",
        "_base",
        "_size",
    )

    def __init__(self) -> None:
        store = wasmtime.Store(engine())
        # trusted, linear-time code: a budget it never reaches, set once
        Budget(store, None, 2**62).arm()
        inst = wasmtime.Instance(store, _compiled(), [])
        ex = inst.exports(store)
        self._store = store
        self._memory = ex["memory"]
        self._mem = GuestMemory(store, self._memory)
        self._subseq = GuestCall(store, ex["subseq"], 2, False)
        self._same = GuestCall(store, ex["same_keys"], 1, False)
        self._max = GuestCall(store, ex["max_series"], 1, False)
        self._bad = GuestCall(store, ex["bad_record"], 2, False)
        # the module never grows its memory, so its address only changes in _load
        self._base, self._size = self._mem.span()

    def _load(self, first: bytes, second: bytes = b"") -> None:
        need = len(first) + len(second)
        if need > self._size:
            self._memory.grow(self._store, (need - self._size + _PAGE - 1) // _PAGE)
            self._base, self._size = self._mem.span()
        _memmove(self._base, first, len(first))
        if second:
            _memmove(self._base + len(first), second, len(second))

    def is_subsequence(self, out: bytes, inp: bytes) -> bool:
        """Are ``out``'s records a subsequence of ``inp``'s (same bytes, same order)?"""
        if out == inp or not out:
            return True
        if len(out) > len(inp):
            return False
        self._load(inp, out)
        return self._subseq(len(inp) // REC, len(out) // REC) == 1

    def same_keys(self, out: bytes, inp: bytes) -> bool:
        """Same count, and each record's timestamp and series id unchanged, in order?"""
        if len(out) != len(inp):
            return False
        if out == inp or not out:
            return True
        self._load(inp, out)
        return self._same(len(inp) // REC) == 1

    def bad_record(self, out: bytes, inp: bytes) -> int:
        """The index of the first output record whose value is not finite or beyond +-1e250,
        or whose timestamp leaves 2000..2100 (what the edge's decoder and the receiver accept;
        widened to the input's own timestamps, and values unchecked when an input value was
        already out of range, so a stage never fails for what it was given), else -1."""
        if not out:
            return -1
        self._load(inp, out)
        r = self._bad(len(inp) // REC, len(out) // REC)
        return r if r < 0x80000000 else r - 0x100000000

    def max_series(self, raw: bytes) -> int:
        """The largest series id in ``raw`` (-1 when empty)."""
        if not raw:
            return -1
        self._load(raw)
        return self._max(len(raw) // REC) & 0xFFFFFFFF
