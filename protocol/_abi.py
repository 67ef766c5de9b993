"""The filter ABI v1 as data (see filters/ABI.md), and the part of its checks that needs no
Wasm engine: the exports a module must or may have and the host functions it may import,
read from the module's binary (:func:`abi_problems`).

The edge (``pipeline.chain``) checks a module fully with wasmtime before it runs it; the cloud
uses :func:`abi_problems` to refuse a module that can never pass those checks before it signs
a bundle naming it.  Standard library only; every loop is bounded by the bytes it reads.
"""

from __future__ import annotations

__all__ = [
    "ABI_VERSION",
    "IMPORTS",
    "OPTIONAL_EXPORTS",
    "REQUIRED_EXPORTS",
    "abi_problems",
    "fmt_sig",
]

ABI_VERSION = 1

Signature = tuple[tuple[str, ...], tuple[str, ...]]

# name -> (params, results) in wasm value types
REQUIRED_EXPORTS: dict[str, Signature] = {
    "ep_abi_version": ((), ("i32",)),
    "ep_input": (("i32",), ("i32",)),
    "ep_process": (("i32",), ("i64",)),
}
OPTIONAL_EXPORTS: dict[str, Signature] = {
    "ep_alloc": (("i32",), ("i32",)),
    "ep_init": (("i32", "i32"), ("i32",)),
    "ep_flush": ((), ("i64",)),
    "ep_snapshot": ((), ("i64",)),
    "ep_restore": (("i32", "i32"), ("i32",)),
}
#: the host functions of module ``edgepipe``; nothing else (no WASI) is granted
IMPORTS: dict[str, Signature] = {
    "series_name": (("i32", "i32", "i32", "i32"), ("i32",)),
    "series_derive": (("i32", "i32", "i32"), ("i32",)),
    "log": (("i32", "i32", "i32"), ()),
}

_VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128"}
_VALTYPES |= {0x70: "funcref", 0x6F: "externref"}


def fmt_sig(sig: Signature) -> str:
    params, results = sig
    return f"({', '.join(params)}) -> ({', '.join(results)})"


class _Unreadable(Exception):
    """An encoding this reader does not know (newer proposals): left to the edge's engine."""


class _Reader:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise _Unreadable("truncated")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self, max_bytes: int = 5) -> int:
        """An unsigned LEB128 of at most ``max_bytes`` bytes (5: u32, 10: u64)."""
        result = shift = 0
        for _ in range(max_bytes):
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
        raise _Unreadable("bad LEB128")

    def u32(self) -> int:
        return self.uleb(5)

    def name(self) -> str:
        n = self.u32()
        if self.pos + n > self.end:
            raise _Unreadable("truncated name")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")

    def count(self) -> int:
        n = self.u32()
        if n > self.end - self.pos:  # every item takes at least one byte
            raise _Unreadable("count larger than its section")
        return n

    def valtype(self) -> str:
        b = self.byte()
        if b not in _VALTYPES:
            raise _Unreadable(f"value type 0x{b:02x}")
        return _VALTYPES[b]

    def limits(self, memory: bool) -> tuple[bool, bool]:
        """-> (64-bit, shared)."""
        flags = self.byte()
        if flags > 0x07:
            raise _Unreadable("limits flags")
        width = 10 if flags & 0x04 else 5  # memory64: u64 limits
        self.uleb(width)
        if flags & 0x01:
            self.uleb(width)
        return bool(flags & 0x04), bool(flags & 0x02) and memory


def _read(wasm: bytes) -> tuple[list[tuple[str, str, Signature | None]], dict[str, object]]:
    """-> (imports as (module, name, signature or None for a non-function),
    exports name -> signature, ``("memory", is_64, shared)`` or the kind's name)."""
    r = _Reader(wasm, 8)
    types: list[Signature] = []
    imports: list[tuple[str, str, Signature | None]] = []
    funcs: list[Signature] = []  # the function index space
    mems: list[tuple[bool, bool]] = []
    raw_exports: list[tuple[str, int, int]] = []
    while r.pos < r.end:
        sid, size = r.byte(), r.u32()
        start, end = r.pos, r.pos + size
        if end > r.end:
            raise _Unreadable("section past the end")
        s = _Reader(wasm, start, end)
        if sid == 1:
            for _ in range(s.count()):
                if s.byte() != 0x60:
                    raise _Unreadable("a type other than a function type")
                params = tuple(s.valtype() for _ in range(s.count()))
                results = tuple(s.valtype() for _ in range(s.count()))
                types.append((params, results))
        elif sid == 2:
            for _ in range(s.count()):
                mod, name, kind = s.name(), s.name(), s.byte()
                if kind == 0x00:
                    idx = s.u32()
                    if idx >= len(types):
                        raise _Unreadable("type index")
                    funcs.append(types[idx])
                    imports.append((mod, name, types[idx]))
                    continue
                if kind == 0x01:
                    s.byte()
                    s.limits(False)
                elif kind == 0x02:
                    mems.append(s.limits(True))
                elif kind == 0x03:
                    s.valtype()
                    s.byte()
                elif kind == 0x04:
                    s.byte()
                    s.u32()
                else:
                    raise _Unreadable("import kind")
                imports.append((mod, name, None))
        elif sid == 3:
            for _ in range(s.count()):
                idx = s.u32()
                if idx >= len(types):
                    raise _Unreadable("type index")
                funcs.append(types[idx])
        elif sid == 5:
            for _ in range(s.count()):
                mems.append(s.limits(True))
        elif sid == 7:
            for _ in range(s.count()):
                raw_exports.append((s.name(), s.byte(), s.u32()))
        r.pos = end
    exports: dict[str, object] = {}
    kinds = {0: "function", 1: "table", 2: "memory", 3: "global", 4: "tag"}
    for name, kind, idx in raw_exports:
        if kind == 0 and idx < len(funcs):
            exports[name] = funcs[idx]
        elif kind == 2 and idx < len(mems):
            exports[name] = ("memory", *mems[idx])
        else:
            exports[name] = kinds.get(kind, "unknown")
    return imports, exports


def abi_problems(wasm: bytes) -> list[str]:
    """What makes ``wasm`` fail the edge's ABI v1 checks of imports and exports (empty: none
    found).  A module in an encoding this reader does not know is left to the edge."""
    if not wasm.startswith(b"\0asm\x01\0\0\0"):
        return ["not a WebAssembly module (version 1)"]
    try:
        imports, exports = _read(wasm)
    except _Unreadable:
        return []
    out: list[str] = []
    for mod, name, sig in imports:
        if mod != "edgepipe" or name not in IMPORTS:
            out.append(f"imports {mod}.{name}, which is not granted (no WASI)")
        elif sig != IMPORTS[name]:
            out.append(
                f"imports {mod}.{name} with the wrong type (ABI v1: {fmt_sig(IMPORTS[name])})"
            )
    mem = exports.get("memory")
    if not (isinstance(mem, tuple) and mem and mem[0] == "memory"):
        out.append("does not export its linear memory as 'memory'")
    elif mem[1] or mem[2]:
        out.append("'memory' must be a 32-bit, unshared memory")
    for fname, want in (*REQUIRED_EXPORTS.items(), *OPTIONAL_EXPORTS.items()):
        got = exports.get(fname)
        if got is None:
            if fname in REQUIRED_EXPORTS:
                out.append(f"missing required export {fname} {fmt_sig(want)}")
        elif got != want:
            out.append(f"export {fname} must have type {fmt_sig(want)}")
    if ("ep_init" in exports or "ep_restore" in exports) and "ep_alloc" not in exports:
        out.append("exports ep_init/ep_restore but not ep_alloc")
    if ("ep_snapshot" in exports) != ("ep_restore" in exports):
        out.append("ep_snapshot and ep_restore go together")
    return out
