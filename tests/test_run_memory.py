"""What ``edgepipe run`` does for its memory before anything else: one malloc arena for
every thread, and no ``importlib.metadata`` (pydantic's plugin loader, the AOT cache key)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from tests.helpers.edge import REPO


def _run_probe(code: str, **env: str) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"} | env,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_one_malloc_arena_set_first_while_single_threaded(tmp_path) -> None:
    out = _run_probe(
        f"""
        import json, threading
        import pipeline.cli._run as run

        calls = []
        real = run._one_malloc_arena

        def spy():
            calls.append((threading.active_count(), real()))
            return calls[-1][1]

        run._one_malloc_arena = spy
        from pipeline.cli import main

        code = main(["run", "-c", {str(tmp_path / "missing.yaml")!r}])
        print(json.dumps({{"code": code, "calls": calls}}))
        """
    )
    assert out["code"] == 2  # the missing config, reported after the arena was set
    assert out["calls"] == [[1, True]], "mallopt(M_ARENA_MAX, 1) first, with one thread"


def test_run_path_does_not_import_importlib_metadata(tmp_path) -> None:
    out = _run_probe(
        f"""
        import json, sys
        from pipeline.cli import main

        code = main(["run", "-c", {str(tmp_path / "missing.yaml")!r}])
        import pipeline._compose, pipeline.chain._chain, pipeline.wasm._aot, storage
        from config._models import StageConfig

        StageConfig.model_validate({{"name": "s", "module": "f.wasm"}})
        print(json.dumps({{"code": code, "metadata": "importlib.metadata" in sys.modules,
                           "loader": sys.modules["pydantic.plugin._loader"].__doc__}}))
        """
    )
    assert out["code"] == 2
    assert not out["metadata"], "edgepipe run imports importlib.metadata"
    assert out["loader"] == "no pydantic plugins (edgepipe run)"


def test_plugin_loader_left_alone_when_plugins_are_enabled() -> None:
    out = _run_probe(
        """
        import json, sys
        from pipeline.cli._run import _no_pydantic_plugin_loader

        _no_pydantic_plugin_loader()
        from pydantic.plugin._loader import get_plugins  # the interface stood in for

        print(json.dumps({"stub": "pydantic.plugin._loader" in sys.modules
                          and sys.modules["pydantic.plugin._loader"].__doc__,
                          "plugins": list(get_plugins())}))
        """,
        PYDANTIC_DISABLE_PLUGINS="some-other-plugin",
    )
    assert out["stub"] != "no pydantic plugins (edgepipe run)"
    assert out["plugins"] == []


def test_aot_cache_key_version_is_the_distribution_version() -> None:
    from importlib.metadata import version

    from pipeline.wasm._aot import WASMTIME_VERSION, _wasmtime_version

    assert WASMTIME_VERSION == _wasmtime_version() == version("wasmtime")
