"""Signed bundles for the receiver-side tests: one fleet signing key per test session, a
filters directory made from the library's modules, and a bundle created and stored from it."""

from __future__ import annotations

from pathlib import Path

from cloud import Backend
from cloud._bundle_cli import create_bundle
from protocol import _bundle

__all__ = ["KEY", "REPO", "filters_dir", "make_bundle"]

REPO = Path(__file__).resolve().parents[2]
KEY = _bundle.SigningKey.generate()


def filters_dir(tmp: Path, modules: tuple[str, ...] = ("validity",), tag: str = "") -> Path:
    lib = tmp / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    stages = []
    for m in modules:
        (lib / f"{m}.wasm").write_bytes((REPO / "filters/lib" / f"{m}.wasm").read_bytes())
        stages.append(f"  - name: {m}\n    module: lib/{m}.wasm\n    kind: filter\n")
    path = tmp / "filters.yaml"
    path.write_text(f"# {tag}\nversion: 1\nchain:\n" + "".join(stages))
    return path


def make_bundle(backend: Backend, tmp: Path, **kw: object) -> dict:
    return create_bundle(
        backend,
        KEY,
        filters_dir(tmp, **kw),  # type: ignore[arg-type]
        fleet="default",
        priority="normal",
        valid_days=1,
    )
