"""A disk cache of compiled (ahead-of-time) Wasm modules.

Compiling a module with Cranelift takes tens of milliseconds on a small device; loading
its serialized machine code takes well under one.  Entries are keyed by the sha256 of
the module bytes, the wasmtime version and the engine settings, and every file carries a
header with that key and a sha256 of the payload: a truncated, corrupt or stale file is
never handed to ``Module.deserialize`` (which trusts its input) -- it is recompiled and
replaced atomically.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from pathlib import Path

import wasmtime

from core._fsutil import atomic_write

try:
    from importlib.metadata import version as _dist_version

    WASMTIME_VERSION = _dist_version("wasmtime")
except Exception:  # pragma: no cover - not installed as a distribution
    WASMTIME_VERSION = "unknown"

__all__ = ["ModuleCache", "cache_key"]

log = logging.getLogger("edgepipe.aot")

_MAGIC = b"EPAOT\x00\x01\x00"
# magic, key sha256, payload sha256, payload length
_HEADER = struct.Struct("<8s32s32sQ")


def cache_key(wasm_sha256: str, engine_settings: str) -> bytes:
    text = f"{wasm_sha256}\0wasmtime-{WASMTIME_VERSION}\0{engine_settings}"
    return hashlib.sha256(text.encode()).digest()


class ModuleCache:
    """Compiled modules under ``directory`` (created on demand); ``None`` disables it."""

    def __init__(self, directory: Path | None, engine: wasmtime.Engine, settings: str) -> None:
        self.directory = directory
        self.engine = engine
        self.settings = settings
        self.hits = self.misses = 0

    def _path(self, key: bytes) -> Path:
        assert self.directory is not None
        return self.directory / f"{key.hex()[:40]}.cwasm"

    def load(self, wasm: bytes, sha256: str) -> wasmtime.Module:
        """The compiled module for ``wasm`` (whose sha256 hex digest is ``sha256``)."""
        if self.directory is None:
            self.misses += 1
            return wasmtime.Module(self.engine, wasm)
        key = cache_key(sha256, self.settings)
        path = self._path(key)
        module = self._read(path, key)
        if module is not None:
            self.hits += 1
            return module
        self.misses += 1
        module = wasmtime.Module(self.engine, wasm)
        self._write(path, key, bytes(module.serialize()))
        return module

    def _read(self, path: Path, key: bytes) -> wasmtime.Module | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("AOT cache %s unreadable (%s); recompiling", path, e.strerror)
            return None
        why = None
        if len(data) < _HEADER.size:
            why = "truncated header"
        else:
            magic, file_key, digest, length = _HEADER.unpack_from(data)
            payload = memoryview(data)[_HEADER.size :]
            if magic != _MAGIC:
                why = "bad magic"
            elif file_key != key:
                why = "key mismatch"
            elif length != len(payload):
                why = "truncated payload"
            elif hashlib.sha256(payload).digest() != digest:
                why = "checksum mismatch"
            else:
                try:
                    return wasmtime.Module.deserialize(self.engine, payload.tobytes())
                except wasmtime.WasmtimeError as e:
                    why = f"not loadable by this engine ({str(e).splitlines()[0]})"
        log.warning("AOT cache entry %s rejected: %s; recompiling", path, why)
        return None

    def _write(self, path: Path, key: bytes, payload: bytes) -> None:
        assert self.directory is not None
        header = _HEADER.pack(_MAGIC, key, hashlib.sha256(payload).digest(), len(payload))
        try:
            atomic_write(path, header + payload)
        except OSError as e:  # a read-only or full disk only costs compile time
            log.warning("cannot write AOT cache entry %s: %s", path, e.strerror)
