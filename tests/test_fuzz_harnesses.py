"""The coverage-guided fuzzers in ``fuzz/`` (atheris), each a short bounded run from its
committed seed corpus, in a subprocess of its own so atheris's instrumentation touches no
other test.  A harness fails (non-zero exit, a crash file) on any exception other than the
documented refusal, or on an accepted input that does not round-trip; the longer runs are in
docs/security.md ("Fuzzing")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.edge import REPO

RUNS = int(os.environ.get("EDGEPIPE_FUZZ_RUNS", "20000"))
HARNESSES = ("wire", "codecs", "records")


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_finds_nothing_in_a_short_run(name: str, tmp_path: Path) -> None:
    seeds = REPO / "fuzz" / "corpus" / name
    assert len(list(seeds.iterdir())) >= 5, "the seed corpus is missing"
    corpus = tmp_path / "corpus"  # libFuzzer adds what it finds to the first directory
    shutil.copytree(seeds, corpus)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "fuzz" / f"{name}.py"),
            f"-runs={RUNS}",
            "-max_len=4096",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, f"{crashes}\n{proc.stderr[-6000:]}"
    assert f"Done {RUNS} runs" in proc.stderr, proc.stderr[-2000:]


def test_a_harness_reports_an_undocumented_exception(tmp_path: Path) -> None:
    """The runner itself can fail: a harness whose target raises a bare ValueError for one
    input exits non-zero and leaves that input as a crash file."""
    harness = tmp_path / "broken.py"
    harness.write_text(
        "import sys, atheris\n"
        "def one(data):\n"
        "    if data[:1] == b'x':\n"
        "        raise ValueError('not documented')\n"
        "atheris.Setup(sys.argv, one)\n"
        "atheris.Fuzz()\n"
    )
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "x").write_bytes(b"x")
    proc = subprocess.run(
        [sys.executable, str(harness), "-runs=10", f"-artifact_prefix={tmp_path}/", str(seeds)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "ValueError: not documented" in proc.stdout + proc.stderr
    assert [p.read_bytes() for p in tmp_path.glob("crash-*")] == [b"x"]
