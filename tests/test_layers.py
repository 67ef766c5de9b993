"""Layers only point down: the import-linter contracts in pyproject.toml hold for the tree,
and the check really fails on an upward import (a copy of the tree with one added)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
PACKAGES = CONFIG["root_packages"]


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c;"
         " sys.exit(c())", "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _copy_tree(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "static", "data")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dst / pkg, ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_every_package_is_in_a_contract() -> None:
    on_disk = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"bench", "tests", "filters"}
    assert on_disk == set(PACKAGES), "a new top-level package needs a place in the layers"


def test_the_tree_keeps_every_contract() -> None:
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


@pytest.mark.parametrize(
    ("module", "upward", "contract"),
    [
        ("core/_model.py", "import storage", "the edge: each layer"),
        ("storage/_store.py", "import sync", "the edge: each layer"),
        ("pipeline/ingest/_decoder.py", "from pipeline import _runtime", "inside pipeline"),
        ("cloud/_wire.py", "import storage", "the cloud receiver shares only"),
        ("pipeline/_runtime.py", "import cloud", "the edge process never imports"),
        ("pipeline/ingest/_decoder.py", "import storage", "the edge's components"),
        ("pipeline/chain/_stage.py", "import sync", "the edge's components"),
        ("sync/_worker.py", "import pipeline.chain", "the edge's components"),
        ("devtools/_dataset.py", "import protocol._keys", "devtools (private brokers"),
        ("storage/_codec.py", "from storage import _store", "inside storage"),
        ("pipeline/ingest/_decoder.py", "import aiosqlite", "aiosqlite"),
    ],
)
def test_an_upward_import_breaks_the_check(tmp_path, module, upward, contract) -> None:
    root = _copy_tree(tmp_path)
    with open(root / module, "a") as f:
        f.write(f"\n{upward}  # a deliberate upward import\n")
    r = _lint(root)
    assert r.returncode != 0, r.stdout[-4000:]
    broken = r.stdout[r.stdout.index("Broken contracts") :]
    assert contract in broken, broken[:2000]


def test_no_module_import_cycle() -> None:
    """No two modules of the project import each other, directly or around a loop (imports
    under ``if TYPE_CHECKING:`` excepted: they never run)."""
    import grimp

    graph = grimp.build_graph(*PACKAGES, cache_dir=None, exclude_type_checking_imports=True)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in graph.modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    assert not cycles, cycles
