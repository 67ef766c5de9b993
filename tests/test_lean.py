"""The edge process imports only what the edge path needs (memory budget: < 50 MB RSS)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers.edge import REPO

CLOUD_STACK = ("starlette", "uvicorn", "psycopg", "argon2", "httpx", "anyio", "fastapi")


def test_edge_process_does_not_import_the_cloud_web_stack():
    code = (
        "import json, sys\n"
        "import pipeline.cli._run, pipeline._runtime, pipeline.ingest._decoder, pipeline.ingest._mqtt\n"
        "import pipeline.chain._chain, pipeline._http, storage, sync._worker\n"
        "from pipeline.cli import build_parser; build_parser()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    mods = json.loads(out)
    heavy = [m for m in mods if m.split(".")[0] in CLOUD_STACK]
    assert not heavy, f"the edge process imports the cloud stack: {heavy[:10]}"
    assert "cloud" not in {m.split(".")[0] for m in mods}


def test_cli_help_stays_light():
    """`edgepipe --help` must not pay for wasmtime, paho or cryptography."""
    code = (
        "import sys, contextlib, io\n"
        "from pipeline.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.split()
    for heavy in ("wasmtime", "paho", "cryptography", "aiosqlite", "pydantic"):
        assert heavy not in out, f"--help imports {heavy}"
