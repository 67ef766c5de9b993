"""``edgepipe-cloud``'s exit codes for a database it cannot use: no database at the URL
given and a URL it does not understand are usage errors (exit 2), a server it cannot reach
is a runtime failure (exit 1, it may come back); each one line, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.helpers.cloud_client import PG_DSN

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_CLOUD_")}
    return subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**env, "PYTHONPATH": str(REPO)},
        timeout=60,
    )


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgepipe-cloud: "), r.stderr
    return lines[0]


def with_path(dsn: str, *, db: str | None = None, port: int | None = None) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc if port is None else f"{parts.netloc.rsplit(':', 1)[0]}:{port}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{db}" if db else parts.path))


@pytest.mark.parametrize("command", [["users", "list"], ["devices", "list"], ["init"]])
def test_postgres_database_that_does_not_exist(tmp_path, command):
    url = with_path(PG_DSN, db="edgepipe_no_such_db")
    with psycopg.connect(PG_DSN, autocommit=True) as conn:  # the server is there; that db not
        assert not conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = 'edgepipe_no_such_db'"
        ).fetchall()
    r = cli(*command, "--db", url, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = one_line(r)
    assert f"no edgepipe-cloud database at {url}: the server has no database " in line
    assert "'edgepipe_no_such_db'" in line and "given with --db" in line
    assert "createdb" in line


def test_postgres_server_unreachable_is_a_runtime_failure(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = with_path(PG_DSN, port=port)
    r = cli("users", "list", "--db", url, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    line = one_line(r)
    assert f"cannot connect to the database at {url}: " in line and "refused" in line


def test_password_is_not_shown(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = cli("users", "list", "--db", f"postgresql://u:hunter2@127.0.0.1:{port}/x", cwd=tmp_path)
    assert r.returncode == 1 and "hunter2" not in r.stderr and "u:***@" in one_line(r)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--db", "mysql://x", "users", "list"], "unsupported scheme 'mysql'"),
        (["users", "list", "--db", "mysql://x"], "unsupported scheme 'mysql'"),
        (["init", "--db", f"{PG_DSN}?schema=a-b"], "?schema= must be a plain SQL identifier"),
    ],
)
def test_database_url_it_cannot_use_is_a_usage_error(tmp_path, argv, says):
    r = cli(*argv, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert says in one_line(r)
    assert list(tmp_path.iterdir()) == []  # nothing created
