"""The ingest kernel: a batch's identities and its common JSON readings in one Wasm call.

``kernel/ingest.c`` (built to the committed ``kernel/ingest.wasm`` by
``kernel/build.py``; ``--check`` proves the binary matches its source) computes, for every
message of a batch, its identity (keyed BLAKE2b-128 of ``topic\\0payload``, bit-identical
to :func:`hashlib.blake2b`) and, for a payload of the shape :func:`._codecs.simple_json`
takes in one call, its 24-byte record; every other payload is left to the Python path.
Like the chain's check kernel it is the host's own code: its own engine without fuel or a
deadline (it is linear in the bytes and cannot loop), called holding the GIL, loaded
through the AOT cache when there is one.

Memory layout of a call, from the module's ``heap_base``: the header (``struct batch`` of
ingest.c), the key and timestamp field names, then per batch the lengths, series codes and
arrival times, the identities, statuses and records it writes, and the message bytes.
"""

from __future__ import annotations

import hashlib
import platform
import struct
import threading
from array import array
from pathlib import Path

import wasmtime

from ..wasm._aot import ModuleCache
from ..wasm._ffi import GuestCall, GuestMemory, host_engine, memmove, string_at

__all__ = ["IngestKernel"]

_WASM = Path(__file__).with_name("kernel") / "ingest.wasm"
_HEADER = struct.Struct("<13I")
_PAGE = 65536
#: memory kept between batches; a batch that grew it beyond this drops the instance
#: afterwards, so the memory returns to the system
KEEP_BYTES = 1024 * 1024
_SETTINGS = f"ingest;opt=speed;{platform.machine()}"
_module: list[tuple[wasmtime.Engine, wasmtime.Module]] = []
_lock = threading.Lock()


def _reserve(store: wasmtime.Store, memory: wasmtime.Memory, mem: GuestMemory, end: int) -> int:
    """The host address of an instance's memory, grown to at least ``end`` bytes."""
    base, size = mem.span()
    if end > size:
        memory.grow(store, (end - size + _PAGE - 1) // _PAGE)
        base, size = mem.span()
    return base


def _compiled(cache_dir: Path | None) -> tuple[wasmtime.Engine, wasmtime.Module]:
    """The module, compiled (or loaded from the AOT cache) once per process."""
    if not _module:
        with _lock:
            if not _module:
                eng = host_engine()
                wasm = _WASM.read_bytes()
                sha = "edgepipe-ingest:" + hashlib.sha256(wasm).hexdigest()
                _module.append((eng, ModuleCache(cache_dir, eng, _SETTINGS).load(wasm, sha)))
    return _module[0]


class IngestKernel:
    """One instance of the kernel for a decoder (not thread-safe, like the decoder):
    ``key`` the identity key (at most 64 bytes), ``fields`` the timestamp field names a
    series code's low byte indexes, payloads longer than ``max_payload`` left to Python."""

    __slots__ = ("_cache", "_key", "_names", "_max", "_store", "_mem", "_memory", "_run", "_layout")

    def __init__(
        self, key: bytes, fields: list[str], max_payload: int, cache_dir: Path | None = None
    ) -> None:
        self._cache = cache_dir
        self._max = min(max_payload, 0xFFFFFFFF)
        self._key = key[:64]
        self._names = [f.encode() for f in fields]
        self._store: wasmtime.Store | None = None

    def _instantiate(self) -> None:
        eng, module = _compiled(self._cache)
        store = wasmtime.Store(eng)
        ex = wasmtime.Instance(store, module, []).exports(store)
        self._store = store
        self._memory = ex["memory"]
        self._mem = GuestMemory(store, self._memory)
        self._run = GuestCall(store, ex["run"], 1, False, trusted=True)
        # the header, then the key and the timestamp field names (the same every call)
        hdr = GuestCall(store, ex["heap_base"], 0, False, trusted=True)() + 7 & ~7
        p_key = hdr + 64
        p_fields = p_key + 64
        table, at = array("I"), p_fields + 8 * len(self._names)
        for name in self._names:
            table.extend((at, len(name)))
            at += len(name)
        static = self._key + bytes(64 - len(self._key)) + table.tobytes() + b"".join(self._names)
        self._layout = (hdr, p_key, p_fields, len(self._names), at + 7 & ~7)
        memmove(self._reserve(p_key + len(static)) + p_key, static, len(static))

    def _reserve(self, end: int) -> int:
        """The memory's host address, with at least ``end`` bytes."""
        if self._store is None:
            self._instantiate()
        return _reserve(self._store, self._memory, self._mem, end)  # type: ignore[arg-type]

    def close(self) -> None:
        """Free the instance and its memory (the next call makes a new one)."""
        self._store = None
        self._mem = self._memory = self._run = None  # type: ignore[assignment]

    def run(self, parts: list[bytes], codes: array, arrivals: array) -> tuple[bytes, bytes, bytes]:
        """``parts``: ``topic\\0`` and payload of each message in turn; ``codes``: per
        message ``series id << 8 | timestamp field index``, or -1 (not the simple shape);
        ``arrivals``: arrival times (ms).  -> (16-byte identities, one status byte per
        message: 1 if its record was made, the records of those in order)."""
        n = len(codes)
        if self._store is None:
            self._instantiate()
        hdr, p_key, p_fields, nfields, p_lens = self._layout
        lens = array("I", map(len, parts))
        blob = b"".join(parts)
        p_codes = p_lens + 8 * n
        p_arr = p_codes + 8 * n
        p_ids = p_arr + 8 * n
        p_status = p_ids + 16 * n
        p_recs = p_status + n + 7 & ~7
        p_blob = p_recs + 24 * n
        base = self._reserve(p_blob + len(blob))
        head = _HEADER.pack(
            n, len(self._key), self._max, nfields, p_blob, p_lens, p_codes, p_arr,
            p_fields, p_key, p_ids, p_status, p_recs,
        )  # fmt: skip
        memmove(base + hdr, head, len(head))
        memmove(base + p_lens, lens.buffer_info()[0], 8 * n)
        memmove(base + p_codes, codes.buffer_info()[0], 8 * n)
        memmove(base + p_arr, arrivals.buffer_info()[0], 8 * n)
        memmove(base + p_blob, blob, len(blob))
        made = self._run(hdr)
        out = (
            string_at(base + p_ids, 16 * n),
            string_at(base + p_status, n),
            string_at(base + p_recs, 24 * made),
        )
        if p_blob + len(blob) > KEEP_BYTES:
            self.close()
        return out


#: the most bits of a redelivery filter (ingest.c: ``BLOOM_LOG2``)
BLOOM_LOG2 = 23
BLOOM_BYTES = 1 << (BLOOM_LOG2 - 3)
#: identities copied in per call when adding many (bounds the memory above the bits)
_ADD_CHUNK = 4096


class BloomBits:
    """A Bloom filter's ``2**log2`` bits (at most 1 MiB) in an instance of the kernel of its
    own (``bloom_add``/``bloom_test`` of ingest.c: four probes, the low ``log2`` bits of
    each 32-bit word of a 16-byte identity), the bit-for-bit counterpart of storage's
    Python one (:class:`storage._seenfilter.PyBits`);
    one call per batch instead of a Python loop per identity.  The store uses it from its
    worker thread and the runtime from the event loop: a lock keeps their calls apart.
    :meth:`close` frees the instance and its memory."""

    __slots__ = ("_store", "_mem", "_memory", "_add", "_test", "_keys", "_lock")

    def __init__(self, log2: int = BLOOM_LOG2, cache_dir: Path | None = None) -> None:
        eng, module = _compiled(cache_dir)
        store = wasmtime.Store(eng)
        ex = wasmtime.Instance(store, module, []).exports(store)
        self._store: wasmtime.Store | None = store
        self._memory = ex["memory"]
        self._mem = GuestMemory(store, self._memory)
        self._add = GuestCall(store, ex["bloom_add"], 2, False, trusted=True)
        self._test = GuestCall(store, ex["bloom_test"], 3, False, trusted=True)
        GuestCall(store, ex["bloom_size"], 1, False, trusted=True)(min(log2, BLOOM_LOG2))
        bits = GuestCall(store, ex["heap_base"], 0, False, trusted=True)() + 7 & ~7
        self._keys = bits + BLOOM_BYTES
        self._lock = threading.Lock()
        self._reserve(self._keys)

    def _reserve(self, end: int) -> int:
        return _reserve(self._store, self._memory, self._mem, end)  # type: ignore[arg-type]

    def add(self, keys: bytes) -> None:
        """Set the bits of the 16-byte identities joined in ``keys`` (none once closed)."""
        step = 16 * _ADD_CHUNK
        with self._lock:
            if self._store is None:
                return
            for at in range(0, len(keys), step):
                part = keys[at : at + step]
                base = self._reserve(self._keys + len(part))
                memmove(base + self._keys, part, len(part))
                self._add(self._keys, len(part) // 16)

    def test(self, keys: bytes) -> bytes:
        """One byte per 16-byte identity joined in ``keys``: 1 if it may have been added
        (every one, once closed: the caller then looks them all up)."""
        n = len(keys) // 16
        out = self._keys + len(keys)
        with self._lock:
            if self._store is None:
                return b"\1" * n
            base = self._reserve(out + n)
            memmove(base + self._keys, keys, len(keys))
            self._test(self._keys, n, out)
            return string_at(base + out, n)

    def close(self) -> None:
        """Free the instance and its memory; idempotent (a call on another thread ends
        first)."""
        with self._lock:
            self._store = None
            self._mem = self._memory = self._add = self._test = None  # type: ignore[assignment]
