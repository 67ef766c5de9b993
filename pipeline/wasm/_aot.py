"""A disk cache of compiled (ahead-of-time) Wasm modules.

Compiling a module with Cranelift takes tens of milliseconds on a small device; loading
its serialized machine code takes well under one.  Entries are keyed by the sha256 of
the module bytes, the wasmtime version, the engine settings and the host target (see
:func:`host_target`), and every file carries a header with that key and a sha256 of the
payload: a truncated, corrupt or stale file is never handed to ``Module.deserialize``
(which trusts its input) -- it is recompiled and replaced atomically.

The target is in the key because Cranelift compiles for the CPU features it detects:
machine code made on one CPU is refused on another ("compilation settings of module
incompatible with native host").  With the features in the key, boards of different CPUs
sharing one cache directory each find their own entry instead of recompiling -- and
overwriting each other's -- on every start.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import struct
import sys
from pathlib import Path

import wasmtime

from core._fsutil import atomic_write

__all__ = ["ModuleCache", "cache_key", "host_target"]

log = logging.getLogger("edgepipe.aot")


def _wasmtime_version() -> str:
    """The installed wasmtime distribution's version (part of every cache key), read from
    the ``Version:`` of its one ``wasmtime-*.dist-info/METADATA`` beside the package:
    ``importlib.metadata`` gives the same but imports email, zipfile, csv and more and
    scans every entry of ``sys.path`` (~0.7 MB and ~9 ms of an edge start); it is the
    fallback when there is no single dist-info there."""
    found = list(Path(wasmtime.__file__).resolve().parent.parent.glob("wasmtime-*.dist-info"))
    if len(found) == 1:
        try:
            with open(found[0] / "METADATA", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("Version:"):
                        return line.partition(":")[2].strip()
                    if not line.strip():
                        break  # the end of the headers
        except OSError:
            pass
    try:
        from importlib.metadata import version

        return version("wasmtime")
    except Exception:  # pragma: no cover - not installed as a distribution
        return "unknown"


WASMTIME_VERSION = _wasmtime_version()

_MAGIC = b"EPAOT\x00\x01\x00"
# magic, key sha256, payload sha256, payload length
_HEADER = struct.Struct("<8s32s32sQ")


#: getauxval(3) entries: the CPU feature bits the kernel reports (and qemu-user emulates)
_AT_HWCAP, _AT_HWCAP2 = 16, 26


@functools.cache
def host_target() -> str:
    """The architecture and CPU features machine code compiled here depends on.

    wasmtime-py exposes no precompiled-compatibility hash, so this is the features the way
    Cranelift's host detection sees them: on Arm the kernel's ``AT_HWCAP``/``AT_HWCAP2``
    words (what Rust's feature detection reads; qemu-user sets them per CPU model), on x86
    the CPUID flags of ``/proc/cpuinfo``.  Both are supersets of what wasmtime checks when
    it loads a module, so two CPUs never share an entry that one of them would refuse."""
    machine = os.uname().machine
    return f"{machine}-{sys.platform}:{_cpu_features(machine)}"


def _cpu_features(machine: str) -> str:
    if machine.startswith(("aarch64", "arm")):
        try:
            import ctypes

            getauxval = ctypes.CDLL(None).getauxval
            getauxval.restype = ctypes.c_ulong
            getauxval.argtypes = [ctypes.c_ulong]
            return f"hwcap={getauxval(_AT_HWCAP):#x},hwcap2={getauxval(_AT_HWCAP2):#x}"
        except (OSError, AttributeError):
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    flags = " ".join(sorted(value.split()))
                    return "flags=" + hashlib.sha256(flags.encode()).hexdigest()[:16]
    except OSError:
        pass
    return "features-unknown"


def cache_key(wasm_sha256: str, engine_settings: str, target: str | None = None) -> bytes:
    """The key of a compiled module: what it was compiled from, by what and for what CPU
    (``target``, by default :func:`host_target`)."""
    target = host_target() if target is None else target
    text = f"{wasm_sha256}\0wasmtime-{WASMTIME_VERSION}\0{engine_settings}\0{target}"
    return hashlib.sha256(text.encode()).digest()


class ModuleCache:
    """Compiled modules under ``directory`` (created on demand); ``None`` disables it.

    ``target`` (default :func:`host_target`) is the CPU the entries are for: a directory
    shared by different CPUs holds one entry per module and CPU."""

    def __init__(
        self,
        directory: Path | None,
        engine: wasmtime.Engine,
        settings: str,
        target: str | None = None,
    ) -> None:
        self.directory = directory
        self.engine = engine
        self.settings = settings
        self.target = target
        self.hits = self.misses = 0

    def _path(self, key: bytes) -> Path:
        assert self.directory is not None
        return self.directory / f"{key.hex()[:40]}.cwasm"

    def load(self, wasm: bytes, sha256: str) -> wasmtime.Module:
        """The compiled module for ``wasm`` (whose sha256 hex digest is ``sha256``)."""
        if self.directory is None:
            self.misses += 1
            return wasmtime.Module(self.engine, wasm)
        key = cache_key(sha256, self.settings, self.target)
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
