"""Shared helpers for the Wasm filter tests: module paths, the air-quality data set,
stage configs and hostile/minimal WAT modules."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from config._models import LimitsConfig, MatchConfig, StageConfig
from core._model import Batch, SeriesRegistry

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "filters" / "lib"
DEVICE = "airq-1"


def airquality(registry: SeriesRegistry) -> Batch:
    """The UCI air-quality data (9,357 hourly rows x 13 metrics) as one batch, in file
    order (row by row, metrics in column order); -200 marks a missing value."""
    from bench.chain import read_airquality
    from devtools._dataset import FULL

    return read_airquality(FULL, registry, DEVICE)


def stage(
    name: str,
    module: str | Path,
    kind: str,
    config: dict[str, Any] | None = None,
    on_error: str = "dead_letter",
    match: dict[str, Any] | None = None,
    sha256: str | None = None,
    **limits: Any,
) -> StageConfig:
    path = module if isinstance(module, Path) else LIB / f"{module}.wasm"
    return StageConfig(
        name=name,
        module=path,
        kind=kind,
        config=config or {},
        on_error=on_error,
        match=MatchConfig(**(match or {})),
        sha256=sha256,
        limits=LimitsConfig(**limits),
    )


def batches(batch: Batch, size: int) -> list[Batch]:
    idx = range(len(batch))
    return [batch.take(idx[i : i + size]) for i in range(0, len(batch), size)]


def run_chain(chain: Any, batch: Batch, size: int, flush: bool = False) -> Batch:
    out = Batch()
    for b in batches(batch, size):
        res = chain.process(b)
        assert not res.dead_letters, res.dead_letters[0].reason
        out.extend(res.batch)
    if flush:
        out.extend(chain.flush().batch)
    return out


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# -- WAT building blocks ------------------------------------------------------------


#: A well-behaved identity filter_map module in WAT, with hooks to make it misbehave.
def wat_module(
    process_body: str = "(i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.extend_i32_u (local.get 0)))",
    *,
    extra: str = "",
    init_body: str = "(i32.const 0)",
    version: int = 1,
    imports: str = "",
    memory_pages: int = 2,
) -> str:
    return f"""
(module
  {imports}
  (memory (export "memory") {memory_pages})
  (func (export "ep_abi_version") (result i32) (i32.const {version}))
  (func (export "ep_input") (param i32) (result i32) (i32.const 1024))
  (func (export "ep_alloc") (param i32) (result i32) (i32.const 65536))
  (func (export "ep_init") (param i32 i32) (result i32) {init_body})
  (func (export "ep_process") (param i32) (result i64) {process_body})
  {extra}
)
"""


def write_wat(tmp_path: Path, name: str, text: str) -> Path:
    import wasmtime

    path = tmp_path / f"{name}.wasm"
    path.write_bytes(wasmtime.wat2wasm(text))
    return path
