"""Loading a filter module: read, check against its limits and pin, compile (through the
AOT cache) and validate against ABI v1 (exports, imports, memory) before any stage runs it,
and read its config declaration (:mod:`._declared`).  Every refusal is a
:class:`FilterLoadError` with a short ``code`` (filters/ABI.md)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from config._models import StageConfig
from core._errors import FilterLoadError

from ..wasm._aot import ModuleCache
from ._abi import IMPORTS as _IMPORTS
from ._abi import OPTIONAL_EXPORTS as _OPTIONAL
from ._abi import REQUIRED_EXPORTS as _REQUIRED
from ._declared import Declaration, DeclarationError, read_declaration
from ._engine import engine, engine_settings

__all__ = ["MAX_FUNCTION_BYTES", "MAX_FUNCTIONS", "LoadedModule", "load_module"]

#: Compiling is bounded in memory before Cranelift sees the module: its peak grows with
#: the largest function body (one 3.8 MiB function: +124 MB of RSS while compiling), far
#: less with the module size (64 functions of 254 KiB, 16 MiB in all: +46 MB).  Library
#: filters' largest function is 2.4 KiB.
MAX_FUNCTION_BYTES = 256 * 1024
MAX_FUNCTIONS = 20_000


def _leb(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80 or shift > 35:
            return result, i


def _code_bounds(wasm: bytes) -> str | None:
    """Why the module's code section is over the compile bounds (None: within them, or
    malformed, which validation reports)."""
    try:
        i = 8
        while i < len(wasm):
            sid = wasm[i]
            size, j = _leb(wasm, i + 1)
            if sid == 10:
                count, k = _leb(wasm, j)
                if count > MAX_FUNCTIONS:
                    return f"has {count} functions; at most {MAX_FUNCTIONS} are compiled"
                for _ in range(count):
                    body, k = _leb(wasm, k)
                    if body > MAX_FUNCTION_BYTES:
                        return (
                            f"has a function body of {body} bytes; at most "
                            f"{MAX_FUNCTION_BYTES} are compiled"
                        )
                    k += body
                return None
            i = j + size
    except IndexError:
        return None
    return None


@dataclass(frozen=True)
class LoadedModule:
    """A validated, compiled module (shareable between stages and chains)."""

    path: Path
    sha256: str
    size: int
    module: wasmtime.Module
    exports: frozenset[str]
    #: the ``edgepipe.config`` declaration; None for a module that declares nothing
    declaration: Declaration | None = None


def _sig(ty: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(map(str, ty.params)), tuple(map(str, ty.results))


def _fmt_sig(sig: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    return f"({', '.join(sig[0])}) -> ({', '.join(sig[1])})"


def load_module(cfg: StageConfig, base_dir: Path, cache: ModuleCache | None = None) -> LoadedModule:
    """Read, check and compile the stage's module; raise :class:`FilterLoadError`."""
    name = cfg.name
    path = cfg.module if cfg.module.is_absolute() else base_dir / cfg.module
    cap = cfg.limits.module_max_kb * 1024

    def refuse(msg: str, code: str) -> FilterLoadError:
        return FilterLoadError(f"{path}: {msg}", stage=name, code=code)

    try:
        with open(path, "rb") as f:
            wasm = f.read(cap + 1)
    except OSError as e:
        raise refuse(f"cannot read module: {e.strerror}", "unreadable") from None
    if len(wasm) > cap:
        raise refuse(
            f"module is larger than limits.module_max_kb ({cfg.limits.module_max_kb} KiB)",
            "too_large",
        )
    if wasm[:4] != b"\0asm":
        raise refuse("not a WebAssembly binary module", "not_wasm")
    too_big = _code_bounds(wasm)
    if too_big is not None:
        raise refuse(too_big, "too_large")
    digest = hashlib.sha256(wasm).hexdigest()
    if cfg.sha256 is not None and cfg.sha256 != digest:
        raise refuse(f"sha256 is {digest}, the pinned sha256 is {cfg.sha256}", "sha256_mismatch")
    eng = engine()
    try:
        wasmtime.Module.validate(eng, wasm)
    except wasmtime.WasmtimeError as e:
        raise refuse(f"invalid module: {str(e).splitlines()[0]}", "invalid") from None
    try:
        declaration = read_declaration(wasm)
    except DeclarationError as e:
        raise refuse(f"bad config declaration: {e}", "bad_declaration") from None
    cache = cache or ModuleCache(None, eng, engine_settings())
    try:
        module = cache.load(wasm, digest)
    except wasmtime.WasmtimeError as e:
        raise refuse(f"cannot compile module: {str(e).splitlines()[0]}", "invalid") from None

    for imp in module.imports:
        ty = imp.type
        where = f"{imp.module}.{imp.name}"
        if imp.module != "edgepipe" or imp.name not in _IMPORTS:
            raise refuse(
                f"imports {where}, which is not granted (only edgepipe."
                f"{', edgepipe.'.join(_IMPORTS)}; no WASI)",
                "import_denied",
            )
        if not isinstance(ty, wasmtime.FuncType) or _sig(ty) != _IMPORTS[imp.name]:
            raise refuse(
                f"imports {where} with the wrong type (ABI v1: {_fmt_sig(_IMPORTS[imp.name])})",
                "import_denied",
            )
    exports: dict[str, Any] = {e.name: e.type for e in module.exports}
    mem = exports.get("memory")
    if not isinstance(mem, wasmtime.MemoryType):
        raise refuse("does not export its linear memory as 'memory'", "missing_export")
    if mem.is_64 or mem.is_shared:
        raise refuse("'memory' must be a 32-bit, unshared memory", "bad_export")
    if mem.limits.min * 65536 > cfg.limits.memory_mb * 1024 * 1024:
        raise refuse(
            f"needs {mem.limits.min * 64} KiB of memory at start, over limits.memory_mb",
            "memory_limit",
        )
    for fname, want in (*_REQUIRED.items(), *_OPTIONAL.items()):
        ty = exports.get(fname)
        if ty is None:
            if fname in _REQUIRED:
                raise refuse(
                    f"missing required export {fname} {_fmt_sig(want)} (is it an edgepipe "
                    "ABI v1 filter?)",
                    "missing_export",
                )
            continue
        if not isinstance(ty, wasmtime.FuncType) or _sig(ty) != want:
            raise refuse(f"export {fname} must have type {_fmt_sig(want)}", "bad_export")
    if ("ep_init" in exports or "ep_restore" in exports) and "ep_alloc" not in exports:
        raise refuse("exports ep_init/ep_restore but not ep_alloc", "missing_export")
    if ("ep_snapshot" in exports) != ("ep_restore" in exports):
        raise refuse("ep_snapshot and ep_restore go together", "missing_export")
    return LoadedModule(path, digest, len(wasm), module, frozenset(exports), declaration)
