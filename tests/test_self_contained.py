"""The repository is self-contained: whoever clones it has every file its tests, benchmarks
and demo read, so no tracked file points outside it (a sibling checkout, a machine's path)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: a sibling folder of the checkout, or an absolute path of one machine
OUTSIDE = re.compile(
    r"""(\.\./shared\b|REPO\.parent\s*/|parents\[2\]\s*/\s*["']shared|["']/work/|/home/\w+/)"""
)


def test_no_tracked_file_points_outside_the_repository() -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    hits = []
    for name in filter(None, files):
        path = REPO / name.decode()
        if path.suffix in {".wasm", ".png", ".csv"} or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) and path.name != "test_self_contained.py":
                hits.append(f"{name.decode()}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_the_data_set_the_tests_read_is_in_the_repository() -> None:
    from devtools import _dataset

    assert _dataset.FULL.is_relative_to(REPO) and _dataset.FULL.exists()
    assert (REPO / "data" / "README.md").read_text().count("CC BY 4.0")
