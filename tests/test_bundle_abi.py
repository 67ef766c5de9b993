"""protocol._abi: the cloud's engine-free reading of a module's imports and exports refuses
what the edge's full check (wasmtime, pipeline.chain) refuses for the ABI, and passes what
it passes -- compared on the filter library and on modules made wrong one way each."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from config._models import StageConfig
from core._errors import FilterError
from pipeline.chain._module import load_module
from protocol._abi import abi_problems
from tests.helpers.wasm import LIB, wat_module

GOOD = wat_module()
IMPORT_LOG = '(import "edgepipe" "log" (func (param i32 i32 i32)))'
CASES = {
    "good": GOOD,
    "good, imports log": wat_module(imports=IMPORT_LOG),
    "wasi": wat_module(
        imports='(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))'
    ),
    "unknown host function": wat_module(imports='(import "edgepipe" "exec" (func))'),
    "log with the wrong type": wat_module(imports='(import "edgepipe" "log" (func (param i32)))'),
    "imported memory": wat_module(imports='(import "edgepipe" "mem" (memory 1))'),
    "no memory export": GOOD.replace('(memory (export "memory") 2)', "(memory 2)"),
    "no ep_process": GOOD.replace('(export "ep_process")', ""),
    "ep_input with the wrong type": GOOD.replace(
        '(func (export "ep_input") (param i32) (result i32) (i32.const 1024))',
        '(func (export "ep_input") (param i64) (result i32) (i32.const 1024))',
    ),
    "ep_init without ep_alloc": GOOD.replace('(export "ep_alloc")', ""),
    "ep_snapshot without ep_restore": wat_module(
        extra='(func (export "ep_snapshot") (result i64) (i64.const 0))'
    ),
    "memory exported under another name": GOOD.replace('(export "memory")', '(export "mem")'),
}


def _edge_refuses(tmp_path: Path, wasm: bytes) -> str | None:
    path = tmp_path / "m.wasm"
    path.write_bytes(wasm)
    try:
        load_module(StageConfig(name="s", module=path), tmp_path, None)
    except FilterError as e:
        return e.code
    return None


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_cloud_refuses_what_the_edge_refuses(case: str, tmp_path: Path) -> None:
    wasm = wasmtime.wat2wasm(CASES[case])
    edge = _edge_refuses(tmp_path, wasm)
    cloud = abi_problems(wasm)
    assert (edge is None) == (not cloud), (case, edge, cloud)
    assert case.startswith("good") == (edge is None)


@pytest.mark.parametrize("path", sorted(LIB.glob("*.wasm")), ids=lambda p: p.name)
def test_the_filter_library_passes(path: Path) -> None:
    assert abi_problems(path.read_bytes()) == []


def test_truncated_or_lying_modules_never_break_the_reader(tmp_path: Path) -> None:
    assert abi_problems(b"not wasm") == ["not a WebAssembly module (version 1)"]
    good = wasmtime.wat2wasm(GOOD)
    lying = good[:8] + b"\x07\xff\xff\xff\xff\x0f"  # a section larger than the module
    for wasm in [good[:cut] for cut in range(9, len(good), 7)] + [lying]:
        problems = abi_problems(wasm)  # never raises; whatever it says, the edge refuses
        assert all(isinstance(p, str) for p in problems)
        assert _edge_refuses(tmp_path, wasm) is not None
