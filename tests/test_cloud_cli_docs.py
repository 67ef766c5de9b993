"""docs/dashboard.md executed as written: its getting-started commands run in bash, one
after another, against a real ``edgepipe-cloud serve``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers.cloud_cli import REPO, free_port
from tests.helpers.cloud_client import wait_serving
from tests.helpers.pki import TestCA

# -- docs/dashboard.md, executed as written -------------------------------------------------

DOCS = REPO / "docs" / "dashboard.md"


def doc_commands(section: str) -> list[list[str]]:
    """The ``sh`` blocks of a section of docs/dashboard.md, one list of commands per block
    (continuation lines joined as the shell joins them)."""
    text = DOCS.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", body, re.S)
    return [re.sub(r"\\\n\s*", "", block).strip().splitlines() for block in blocks]


def _sh(line: str, env: dict[str, str], cwd: Path, *, tty_answers: list[str] | None = None):
    """Run one documented command line in bash; -> (exit status, output, the environment
    afterwards, so an ``export`` carries over to the next line).  With ``tty_answers`` the
    command runs on a terminal of its own and each answer is typed at a prompt."""
    import fcntl
    import select
    import termios

    env_file = cwd.parent / "env.after"
    script = f'{line}\nrc=$?\nenv -0 > "{env_file}"\nexit $rc\n'
    if tty_answers is None:
        r = subprocess.run(
            ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
        )
        code, output = r.returncode, r.stdout + r.stderr
    else:
        master, slave = os.openpty()

        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=cwd,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=controlling_tty,
        )
        os.close(slave)
        seen, since, answers = b"", 0, list(tty_answers)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal closed: the command is done
                break
            if not chunk:
                break
            seen += chunk
            # A prompt is written once the terminal stopped echoing (and dropped any input
            # typed ahead): answer each prompt when it appears, not before.
            if answers and seen[since:].rstrip().endswith(b":"):
                os.write(master, answers.pop(0).encode() + b"\n")
                since = len(seen)
        os.close(master)
        code, output = proc.wait(30), seen.decode(errors="replace")
        assert not answers, output
    after = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
    return code, output, after


def test_dashboard_getting_started_as_written(tmp_path: Path) -> None:
    """Every command of docs/dashboard.md's "Getting started", run in a shell in an empty
    directory, exactly as written but for the port (8443 becomes a free one); then the
    operators sign in to the receiver it started, and the later ``users remove`` ends
    alice's session."""
    setup, later = doc_commands("Getting started")
    work = tmp_path / "work"
    work.mkdir()
    ca = TestCA(tmp_path)
    cert, key = ca.issue("server")
    shutil.copy(cert, work / "cert.pem")
    shutil.copy(key, work / "key.pem")
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "edgepipe-cloud").exists():  # not installed: the same entry point
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "edgepipe-cloud"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cloud.cli "$@"\n')
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_CLOUD_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(REPO),
        PASSWORD="ci-password-123",
    )
    alice_pw = "alice-password-456"
    port = free_port()
    serve = [line for line in setup if line.startswith("edgepipe-cloud serve")]
    assert len(serve) == 1 and "8443" in serve[0] and setup[-1] == serve[0]
    for line in setup[:-1]:
        prompts = "users add" in line and "--password-stdin" not in line
        code, output, env = _sh(line, env, work, tty_answers=[alice_pw] * 2 if prompts else None)
        assert code == 0, f"{line}\n{output}"
        assert not prompts or "Password (again): " in output  # asked on the terminal
    assert (work / "cloud.db").is_file() and not (work / "edgepipe-cloud.db").exists()

    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + serve[0].replace("8443", str(port))],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"https://localhost:{port}"
        import ssl

        ctx = ssl.create_default_context(cafile=str(ca.path))
        wait_serving(proc, url, tmp_path / "serve.log", verify=ctx, timeout=60)

        def signed_in(name: str, password: str) -> httpx.Client:
            c = httpx.Client(base_url=url, verify=ctx, timeout=30)
            form = c.get("/login")
            token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
            r = c.post("/login", data={"username": name, "password": password, "csrf": token})
            assert r.status_code == 303, (name, r.text)
            assert c.get("/ui/api/fleet").status_code == 200
            return c

        alice = signed_in("alice", alice_pw)
        ci = signed_in("ci", env["PASSWORD"])
        for line in later:
            code, output, env = _sh(line, env, work)
            assert code == 0, f"{line}\n{output}"
        assert alice.get("/ui/api/fleet").status_code == 401  # removed: signed out at once
        assert ci.get("/ui/api/fleet").status_code == 200
        alice.close()
        ci.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
        log.close()
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith("cloud.db-")) == [
        "cert.pem",
        "cloud-master.key",
        "cloud.db",
        "key.pem",
    ]
