"""Every shell command in filters/ABI.md and the SDK READMEs, run exactly as written.

Conventions in those documents (visible in the Markdown source):

- ```` ```c file=NAME ```` (any language): a source or data file; the test writes it,
  verbatim, into the document's working directory before running any command;
- ```` ```sh ```` / ```` ```bash ````: a script, run with ``bash -e -o pipefail``; it must
  succeed;
- ```` ```console ````: ``$ command`` lines, each followed by the output it prints
  (stdout and stderr together); each command must succeed and print that output, where
  ``...`` inside a line matches any text and a line that is only ``...`` matches any
  number of lines;
- ```` ```sh no-run ```` (or ``console no-run``): shown, not run (a system install, an
  environment setting, a command that rewrites the repository).

Each document gets one fresh directory; its commands run there in order with this
package's ``python`` and ``edgepipe`` first on ``PATH`` and ``EDGEPIPE_SDK`` set to the
repository's ``filters/sdk`` (what ABI.md tells a user to export).  Without the wasm32
Rust toolchain the documents that use it skip, except under CI, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.cli._filter import RUST_PACKAGES, find_rustc
from tests.helpers.wasm import REPO

SDK = REPO / "filters" / "sdk"
DOCS = [REPO / "filters" / "ABI.md", *sorted(SDK.glob("**/README*"))]
SHELLS = ("sh", "bash", "console")
_FENCE = re.compile(r"^```(.*)$")


@dataclass(frozen=True)
class Block:
    lang: str
    words: tuple[str, ...]
    body: str
    line: int

    @property
    def file(self) -> str | None:
        for w in self.words:
            if w.startswith("file="):
                return w[len("file=") :]
        return None

    @property
    def runs(self) -> bool:
        return self.lang in SHELLS and "no-run" not in self.words


def blocks(doc: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    out: list[Block] = []
    lines = doc.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        info = m.group(1).split()
        start, i = i, i + 1
        body: list[str] = []
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{doc}:{start + 1}: unclosed code block"
        i += 1
        lang = info[0] if info else ""
        out.append(Block(lang, tuple(info[1:]), "".join(x + "\n" for x in body), start + 1))
    return out


def console_steps(block: Block) -> list[tuple[str, list[str]]]:
    """``$ command`` (with ``\\`` continuation lines) and the output lines after it."""
    steps: list[tuple[str, list[str]]] = []
    lines = block.body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        assert line.startswith("$ "), f"line {block.line + 1 + i}: expected '$ command'"
        cmd = [line[2:]]
        while cmd[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd.append(lines[i])
        i += 1
        expected: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        steps.append(("\n".join(cmd), expected))
    return steps


def output_pattern(expected: list[str]) -> re.Pattern[str]:
    parts = []
    for line in expected:
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(map(re.escape, line.split("..."))) + r"\n")
    return re.compile("".join(parts))


def _needs_rust(block: Block) -> bool:
    return bool(re.search(r"\.rs\b|rustc|cargo", block.body))


def _env(work: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return dict(
        os.environ,
        PATH=os.pathsep.join([bindir, os.environ.get("PATH", "")]),
        EDGEPIPE_SDK=str(SDK),
        PYTHONUNBUFFERED="1",  # stdout and stderr interleaved as on a terminal
        CARGO_HOME=str(work / ".cargo-home"),
    )


def _run(cmd: list[str], work: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=work,
        env=_env(work),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )


def _rel(doc: Path) -> str:
    return str(doc.relative_to(REPO))


def test_the_documents_exist_and_use_the_conventions():
    assert {_rel(d) for d in DOCS} >= {
        "filters/ABI.md",
        "filters/sdk/README-c.md",
        "filters/sdk/README-zig.md",
        "filters/sdk/rust/README.md",
    }
    for doc in DOCS:
        bs = blocks(doc)
        for b in bs:
            where = f"{_rel(doc)}:{b.line}"
            assert b.lang not in ("shell", "zsh", "shell-session"), (
                f"{where}: use sh, bash or console"
            )
            if b.lang in SHELLS:
                assert set(b.words) <= {"no-run"}, f"{where}: unknown marker {b.words}"
                assert b.body.strip(), f"{where}: empty command block"
            if b.file is not None:
                assert "/" not in b.file and b.file not in ("", ".", ".."), where
        assert any(b.runs for b in bs), f"{_rel(doc)} has no command that runs"
        names = [b.file for b in bs if b.file]
        assert len(names) == len(set(names)), f"{_rel(doc)}: a file is shown twice"
    # the blocks that do not run stay few
    assert sum(1 for d in DOCS for b in blocks(d) if b.lang in SHELLS and not b.runs) <= 4


def test_console_output_patterns():
    pat = output_pattern(["a.wasm: ... bytes", "...", "# done"])
    assert pat.fullmatch("a.wasm: 123 bytes\n# done\n")
    assert pat.fullmatch("a.wasm: 123 bytes\nx\ny\n# done\n")
    assert not pat.fullmatch("a.wasm: 123 bytes\n# not done\n")
    assert not pat.fullmatch("b.wasm: 1 bytes\n# done\n")
    assert not output_pattern(["one"]).fullmatch("one\ntwo\n")


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_command_runs_as_written(doc, tmp_path):
    bs = blocks(doc)
    if any(_needs_rust(b) for b in bs if b.runs) and (
        find_rustc() is None or not Path("/usr/bin/cargo").exists() and _uses_cargo(bs)
    ):
        msg = f"no wasm32 rustc / cargo (apt-get install {' '.join(RUST_PACKAGES)} cargo)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    if shutil.which("bash") is None:
        pytest.fail("bash is needed to run the documented commands")
    for b in bs:
        if b.file is not None:
            (tmp_path / b.file).write_text(b.body, encoding="utf-8")
    ran = 0
    for b in bs:
        if not b.runs:
            continue
        where = f"{_rel(doc)}:{b.line}"
        if b.lang == "console":
            for cmd, expected in console_steps(b):
                proc = _run(["bash", "-o", "pipefail", "-c", cmd], tmp_path)
                assert proc.returncode == 0, f"{where}: {cmd}\n{proc.stdout}"
                assert output_pattern(expected).fullmatch(proc.stdout), (
                    f"{where}: {cmd}\nexpected:\n" + "\n".join(expected) + f"\ngot:\n{proc.stdout}"
                )
                ran += 1
        else:
            proc = _run(["bash", "-e", "-o", "pipefail", "-c", b.body], tmp_path)
            assert proc.returncode == 0, f"{where}:\n{b.body}\n{proc.stdout}"
            ran += 1
    assert ran


def _uses_cargo(bs: list[Block]) -> bool:
    return any("cargo" in b.body for b in bs if b.runs)
