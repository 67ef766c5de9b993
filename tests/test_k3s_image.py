"""The edge image: the Containerfile (pinned bases, non-root user, edge-only dependencies,
COPY sources), the edge dependencies' aarch64 wheels, and the builder stage's recipe run on
the host to inspect the venv the image would get.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.k3s import ROOT, containerfile


def test_containerfile_base_images_are_pinned() -> None:
    args = {}
    for instr, rest in containerfile():
        if instr == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
    froms = [rest for instr, rest in containerfile() if instr == "FROM"]
    assert len(froms) >= 2, "a builder stage and a final stage"
    stages = set()
    for f in froms:
        image = f.split()[0]
        for k, v in args.items():
            image = image.replace("${" + k + "}", v).replace("$" + k, v)
        if image in stages:
            continue
        assert image.startswith("python:3.11-slim-bookworm"), image
        name = image.split("@")[0]
        assert ":" in name and not name.endswith(":latest"), image
        if " AS " in f.upper():
            stages.add(f.split()[-1])


def test_containerfile_runs_as_non_root_edgepipe() -> None:
    instrs = containerfile()
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    final = instrs[max(i for i, (instr, _) in enumerate(instrs) if instr == "FROM") :]
    assert any(instr == "USER" for instr, _ in final)
    assert ("ENTRYPOINT", '["edgepipe"]') in final
    assert not any(instr == "HEALTHCHECK" for instr, _ in instrs)


def test_containerfile_installs_only_the_edge_dependencies() -> None:
    text = " ".join(rest for instr, rest in containerfile() if instr == "RUN")
    assert "pip" in text
    assert "[cloud" not in text and "cloud]" not in text and "[test" not in text
    for pkg in ("starlette", "uvicorn", "psycopg", "argon2"):
        assert pkg not in text
    ignore = (ROOT / ".containerignore").read_text().splitlines()
    assert "cloud/" in ignore or "cloud" in ignore or "/cloud" in ignore


def test_containerfile_copy_sources_exist() -> None:
    ignored = [
        ln.strip().strip("/")
        for ln in (ROOT / ".containerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#") and not ln.startswith("!")
    ]
    for instr, rest in containerfile():
        if instr not in ("COPY", "ADD") or "--from=" in rest:
            continue
        parts = [p for p in rest.split() if not p.startswith("--")]
        for src in parts[:-1]:
            matches = (
                list(ROOT.glob(src.rstrip("/"))) if any(ch in src for ch in "*?[") else [ROOT / src]
            )
            assert matches and all(m.exists() for m in matches), f"COPY source {src} missing"
            for m in matches:
                rel = m.relative_to(ROOT).as_posix()
                assert not any(rel == i or rel.startswith(i + "/") for i in ignored), (
                    f"COPY source {src} is excluded by .containerignore"
                )


# -- aarch64 wheels ---------------------------------------------------------------------------


def _index_unreachable() -> str | None:
    """Why the package index can't be reached (None: it can)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    hosts = {urllib.parse.urlsplit(index).hostname or "pypi.org"}
    if hosts == {"pypi.org"}:
        hosts.add("files.pythonhosted.org")  # where PyPI serves the files from
    for host in sorted(hosts):
        try:
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as e:
            return f"{host}:443: {e}"
    return None


@pytest.mark.network
def test_edge_dependencies_have_aarch64_wheels(tmp_path: Path) -> None:
    """Every edge dependency installs from a wheel on linux/arm64 (no compiler in the image)."""
    why = _index_unreachable()
    if why:
        pytest.skip(f"the package index is unreachable ({why}): aarch64 wheels not checked")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--only-binary=:all:",
        "--platform", "manylinux2014_aarch64",
        "--platform", "manylinux_2_17_aarch64",
        "--platform", "manylinux_2_28_aarch64",
        "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
        "-d", str(tmp_path), *deps,
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    wheels = sorted(p.name for p in tmp_path.iterdir())
    assert all(w.endswith(".whl") for w in wheels), wheels
    for dep in deps:
        name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower().replace("-", "_")
        assert any(w.lower().startswith(name + "-") for w in wheels), (dep, wheels)
    native = [w for w in wheels if not w.endswith("-none-any.whl")]
    assert native and all("aarch64" in w for w in native), native


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr, rest in containerfile():
        if instr == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((instr, rest))
    return stages


@pytest.mark.network
def test_builder_stage_recipe_makes_an_edge_only_venv(tmp_path: Path) -> None:
    """No container engine here: run the builder stage's COPY and RUN steps on the host
    (paths mapped into a temporary directory) and inspect the venv the image would get."""
    why = _index_unreachable()
    if why:
        pytest.skip(f"the package index is unreachable ({why}): builder stage not run")
    builder = _stages()[0]
    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    src.mkdir()
    env = dict(os.environ)
    for instr, rest in builder:
        if instr == "ENV":
            env.update(kv.split("=", 1) for kv in rest.split())
        elif instr == "COPY":
            *sources, dest = rest.split()
            for s in sources:
                assert (ROOT / s).exists(), f"COPY source {s} missing"
                if (ROOT / s).is_dir():  # a directory's contents go to dest
                    shutil.copytree(
                        ROOT / s, src / dest, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:  # a file goes into dest/ or becomes dest
                    target = src / dest / s if dest.endswith("/") else src / dest
                    shutil.copy2(ROOT / s, target)
    runs = [rest for instr, rest in builder if instr == "RUN"]
    assert len(runs) == 1
    script = runs[0].replace("/wheels", str(wheels)).replace("/opt/venv", str(venv))
    result = subprocess.run(
        ["bash", "-ec", script], cwd=src, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    python = venv / "bin" / "python"
    out = subprocess.run(
        [str(python), "-c",
         "import importlib.metadata as m, sys; "
         "print('\\n'.join(sorted(d.metadata['Name'].lower() for d in m.distributions())))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower()
        assert name in out, (name, out)
    for web in ("starlette", "uvicorn", "psycopg", "psycopg-binary", "argon2-cffi", "httpx", "pip"):
        assert web not in out, f"{web} must not be in the edge image"
    assert not (venv / "bin" / "edgepipe-cloud").exists()
    site = next(venv.glob("lib/python3.11/site-packages"))
    assert not (site / "cloud").exists()
    assert (venv / "bin" / "edgepipe").exists()
    help_text = subprocess.run(
        [str(venv / "bin" / "edgepipe"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "run" in help_text
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file())
    # the venv is the image's only big layer above the base (compressed about a third)
    assert size < 150 * 2**20, f"venv is {size / 2**20:.0f} MiB"
