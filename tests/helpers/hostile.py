"""A corpus of hostile filter modules in WAT: each misbehaves in one guest entry point
(init, process, flush, snapshot, restore) and is otherwise a stateful identity
``filter_map`` stage (8 bytes of state at 2048, flush emits nothing)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.helpers.wasm import write_wat

IDENTITY = "(i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.extend_i32_u (local.get 0)))"
SNAPSHOT_OK = "(i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const 8))"
#: traps only on a batch whose first record's value is negative
NEGATIVE = "(f64.lt (f64.load (i32.const 1032)) (f64.const 0))"


def module(
    *,
    process: str = IDENTITY,
    init: str = "(i32.const 0)",
    alloc: str = "(i32.const 65536)",
    snapshot: str = SNAPSHOT_OK,
    restore: str = "(i32.const 0)",
    flush: str = "(i64.const 0)",
    extra: str = "",
) -> str:
    return f"""
(module
  (memory (export "memory") 2)
  (func (export "ep_abi_version") (result i32) (i32.const 1))
  (func (export "ep_input") (param i32) (result i32) (i32.const 1024))
  (func (export "ep_alloc") (param i32) (result i32) {alloc})
  (func (export "ep_init") (param i32 i32) (result i32) {init})
  (func (export "ep_process") (param i32) (result i64) {process})
  (func (export "ep_snapshot") (result i64) {snapshot})
  (func (export "ep_restore") (param i32 i32) (result i32) {restore})
  (func (export "ep_flush") (result i64) {flush})
  {extra}
)
"""


BAD_POINTER = "(i64.or (i64.shl (i64.const 0x7fff0000) (i64.const 32)) (i64.const 8))"
ABSURD_COUNT = "(i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 0xffffffff))"
LOOP = "(loop $l (br $l)) (unreachable)"

#: name -> (module fields, stage limits); every one fails at run time, never at load
RUNTIME: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "process_trap": ({"process": "(unreachable)"}, {}),
    "process_infinite_loop": ({"process": LOOP}, {"fuel": None, "timeout_ms": 20}),
    "process_out_of_fuel": ({"process": LOOP}, {"fuel": 100_000}),
    "process_grow_bomb": (
        {
            "process": "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))"
            " (unreachable)"
        },
        {"memory_mb": 2},
    ),
    "process_deep_recursion": (
        {
            "process": "(drop (call $r (i32.const 0))) (i64.const 0)",
            "extra": "(func $r (param i32) (result i32) "
            "(i32.add (call $r (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))",
        },
        {},
    ),
    "process_bad_pointer": (
        {"process": BAD_POINTER.replace("(i64.const 8)", "(i64.extend_i32_u (local.get 0))")},
        {},
    ),
    "process_bad_count": ({"process": ABSURD_COUNT}, {}),
    "process_bad_input_buffer": (
        {"extra": ""},  # ep_input is patched below to return a pointer past the memory
        {},
    ),
    "snapshot_trap": ({"snapshot": "(unreachable)"}, {}),
    "snapshot_bad_pointer": ({"snapshot": BAD_POINTER}, {}),
    "snapshot_absurd_length": (
        {"snapshot": "(i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const 0xffffffff))"},
        {},
    ),
    "snapshot_loop": ({"snapshot": "(loop $l (br $l)) (i64.const 0)"}, {"fuel": 100_000}),
    "restore_refuses": ({"restore": "(i32.const 1)"}, {}),
    "restore_trap": ({"restore": "(unreachable)"}, {}),
    "restore_bad_alloc": ({"alloc": "(i32.const 0x7ffffff0)"}, {}),
    "flush_trap": ({"flush": "(unreachable)"}, {}),
    "flush_bad_pointer": ({"flush": BAD_POINTER}, {}),
    "flush_bad_count": ({"flush": ABSURD_COUNT}, {}),
}

#: name -> (module fields, the FilterLoadError code): refused when the chain is built
AT_LOAD: dict[str, tuple[dict[str, str], str]] = {
    "init_trap": ({"init": "(unreachable)"}, "unreachable"),
    "init_refuses": ({"init": "(i32.const -1)"}, "init"),
    "init_bad_alloc": (
        {"alloc": "(i32.const 0x7ffffff0)", "init": "(i32.const 0)"},
        "out_of_bounds",
    ),
    "init_loop": ({"init": "(loop $l (br $l)) (i32.const 0)"}, "out_of_fuel"),
}


def wat(name: str) -> str:
    fields = RUNTIME[name][0] if name in RUNTIME else AT_LOAD[name][0]
    text = module(**fields)
    if name == "process_bad_input_buffer":
        text = text.replace(
            '(func (export "ep_input") (param i32) (result i32) (i32.const 1024))',
            '(func (export "ep_input") (param i32) (result i32) (i32.const 0x1fff0))',
        )
    return text


def write(tmp_path: Path, name: str) -> Path:
    return write_wat(tmp_path, name, wat(name))


def leb(n: int) -> bytes:
    """``n`` as unsigned LEB128."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def section(sid: int, body: bytes) -> bytes:
    return bytes([sid]) + leb(len(body)) + body


def renamed(path: Path, names: dict[int, str]) -> Path:
    """``path`` with a (second, later: the one wasmtime reads) name section naming the
    functions of ``names`` (index -> any text the guest's author chose)."""
    sub = leb(len(names)) + b"".join(
        leb(i) + leb(len(n.encode())) + n.encode() for i, n in sorted(names.items())
    )
    path.write_bytes(path.read_bytes() + section(0, leb(4) + b"name" + section(1, sub)))
    return path


def huge_module(path: Path, body_bytes: int = 1 << 20) -> Path:
    """A valid module whose one function body is ``body_bytes`` long (i32.const 1; drop
    repeated): what makes Cranelift's memory balloon when it is compiled."""
    code = b"\x00" + b"\x41\x01\x1a" * (body_bytes // 3) + b"\x41\x00\x0b"
    wasm = (
        b"\0asm\x01\0\0\0"
        + section(1, leb(1) + b"\x60\x00\x01\x7f")
        + section(3, leb(1) + b"\x00")
        + section(10, leb(1) + leb(len(code)) + code)
    )
    path.write_bytes(wasm)
    return path


# -- a trap two calls deep, and what its messages must say -------------------------------------
#: ``$inner`` traps; ``$middle`` calls it; the entry point calls ``$middle``: two calls deep.
#: In :func:`module` they are functions 8 and 9.
TWO_DEEP = "(func $inner (result i32) (unreachable)) (func $middle (result i32) (call $inner))"
#: inner < middle < the (unnamed) entry point: function names and module offsets
BACKTRACE = (
    r"wasm backtrace: inner@0x[0-9a-f]+ < middle@0x[0-9a-f]+ < <wasm function \d+>@0x[0-9a-f]+"
)
#: entry point -> a body that traps two calls deep
DEEP_ENTRY = {
    "init": "(call $middle)",
    "process": "(drop (call $middle)) " + IDENTITY,
    "snapshot": "(i64.extend_i32_u (call $middle))",
    "restore": "(call $middle)",
    "flush": "(i64.extend_i32_u (call $middle))",
}


def assert_trap_text(text: str, entry: str) -> None:
    """``text`` says that ``ep_ENTRY`` trapped, why (the trap code's message) and where."""
    assert re.search(
        rf"ep_{entry}: trap \(unreachable\): wasm `unreachable` instruction executed; {BACKTRACE}",
        text,
    ), text
