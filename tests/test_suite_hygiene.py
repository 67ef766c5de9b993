"""The test suite's own rules: shared code lives in ``tests/helpers``, never in a test module
or ``conftest.py``, so no test module imports another one or ``conftest``."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TEST_MODULES = sorted(TESTS.glob("test_*.py"))
FORBIDDEN = {"conftest"} | {p.stem for p in TEST_MODULES}


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .test_x import y
                base = ".".join(["tests", *(node.module or "").split(".")]).rstrip(".")
                out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
            elif node.module:
                out.append((node.lineno, node.module))
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", ""))
            in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.lineno, node.args[0].value))
    return out


def _offending(name: str) -> bool:
    parts = name.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and parts[0] in FORBIDDEN


def test_no_test_module_imports_another_test_module_or_conftest() -> None:
    assert len(TEST_MODULES) > 10, "the test modules were not found"
    bad = [
        f"{p.name}:{line}: imports {name}"
        for p in TEST_MODULES
        for line, name in _imported(ast.parse(p.read_text(), str(p)))
        if _offending(name)
    ]
    assert not bad, "shared code belongs in tests/helpers:\n" + "\n".join(bad)


def test_helpers_do_not_import_test_modules_or_conftest() -> None:
    helpers = sorted((TESTS / "helpers").glob("*.py"))
    assert helpers, "tests/helpers is missing"
    bad = [
        f"helpers/{p.name}:{line}: imports {name}"
        for p in helpers
        for line, name in _imported(ast.parse(p.read_text(), str(p)))
        if _offending(name)
    ]
    assert not bad, "\n".join(bad)


def test_the_check_sees_the_forms_of_import() -> None:
    src = (
        "import conftest\nfrom test_e2e import stored\nimport tests.test_e2e\n"
        "from tests import test_e2e\nimport importlib\nimportlib.import_module('test_e2e')\n"
        "from tests.helpers.edge import wait_for\n"
    )
    flagged = [name for _, name in _imported(ast.parse(src)) if _offending(name)]
    assert flagged == [
        "conftest",
        "test_e2e",
        "test_e2e.stored",
        "tests.test_e2e",
        "tests.test_e2e",
        "test_e2e",
    ]
