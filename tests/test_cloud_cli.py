"""edgepipe-cloud: device credentials and serving, as separate processes."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cloud import MasterKey, open_backend
from cloud.cli import main
from tests.helpers.cloud_client import (
    PG_DSN,
    DeviceClient,
    make_batch,
    pg_schema_url,
    series_readings,
    wait_serving,
)
from tests.helpers.pki import TestCA

REPO = Path(__file__).resolve().parents[1]


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """``edgepipe-cloud ARGS`` to the end; its stderr is the operator's answer at the terminal,
    so the tests check that text (and the outcome in the database, the key file, HTTP)."""
    return subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=60,
    )


def key_file(tmp_path: Path, name: str = "master.key") -> Path:
    path = tmp_path / name
    r = cli("master-key", "generate", "--out", str(path))
    assert r.returncode == 0, r.stderr
    return path


def start_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple:
    """``edgepipe-cloud serve ARGS`` on a free port; -> (process, url, log path)."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloud.cli", "serve", "--port", str(port), *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    wait_serving(proc, url, log)
    return proc, url, log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_devices_add_list_remove(tmp_path: Path, kind: str) -> None:
    key = str(key_file(tmp_path))

    def run(db: str) -> None:
        missing = cli("devices", "--db", db, "list")
        assert missing.returncode == 2 and "no edgepipe-cloud database" in missing.stderr
        assert cli("init", "--db", db).returncode == 0
        added = cli("devices", "--db", db, "--master-key-file", key, "add", "pump-7")
        assert added.returncode == 0, added.stderr
        secret = added.stdout.strip()
        assert len(bytes.fromhex(secret)) == 32
        again = cli("devices", "--db", db, "--master-key-file", key, "add", "pump-7")
        assert again.returncode == 1 and "already exists" in again.stderr
        assert secret not in again.stdout + again.stderr
        listed = cli("devices", "--db", db, "list")
        assert listed.returncode == 0
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [r["name"] for r in rows] == ["pump-7"]
        assert secret not in listed.stdout
        assert cli("devices", "--db", db, "remove", "pump-7").returncode == 0
        gone = cli("devices", "--db", db, "remove", "pump-7")
        assert gone.returncode == 1 and "no device" in gone.stderr
        assert cli("devices", "--db", db, "list").stdout == ""

    if kind == "sqlite":
        run(f"sqlite:///{tmp_path / 'cloud.db'}")
    else:
        with pg_schema_url() as url:
            run(url)


def test_bad_device_name_and_settings(tmp_path: Path) -> None:
    r = cli("devices", "--db", f"sqlite:///{tmp_path / 'c.db'}", "add", "bad name/..")
    assert r.returncode == 2 and "device names" in r.stderr
    r = cli("serve", "--db", f"sqlite:///{tmp_path / 'c.db'}", "--tls-cert", "x.pem")
    assert r.returncode == 2 and "tls_cert and tls_key" in r.stderr


def test_serve_from_environment(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    key = {"EDGEPIPE_CLOUD_MASTER_KEY": cli("master-key", "generate").stdout}  # the key itself
    assert cli("init", "--db", db, env=key).returncode == 0
    secret = bytes.fromhex(cli("devices", "--db", db, "add", "gw-1", env=key).stdout.strip())
    port = free_port()
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        **key,
        "PYTHONPATH": str(REPO),
        "EDGEPIPE_CLOUD_DB": db,
        "EDGEPIPE_CLOUD_API_TOKEN": "tok-123",
        "EDGEPIPE_CLOUD_PORT": str(port),
        "EDGEPIPE_CLOUD_MAX_BODY_MB": "0.5",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloud.cli", "serve", "--host", "127.0.0.1"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_serving(proc, url, log)
        dev = DeviceClient(url, "gw-1", secret)
        assert dev.upload([make_batch(1, series_readings(4))]).json()["acked"] == [1]
        assert dev.upload([make_batch(2, series_readings(4))], secret=b"w" * 32).status_code == 401
        big = dev.post_raw(b"\0" * (600 * 1024), encoding="identity")
        assert big.status_code == 413  # --max-body-mb from the environment
        r = httpx.get(url + "/v1/devices", headers={"Authorization": "Bearer tok-123"})
        assert r.json()["devices"][0]["today"]["readings"] == 4
        dev.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    text = log.read_text()  # what the operator's log collector keeps: never a secret
    assert secret.hex() not in text and "tok-123" not in text
    assert proc.returncode == 0, text


def test_serve_tls(tmp_path: Path) -> None:
    import ssl

    ca = TestCA(tmp_path)
    cert, key = ca.issue("server")
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloud.cli",
                "serve",
                "--db",
                f"sqlite:///{tmp_path / 'c.db'}",
                "--port",
                str(port),
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                "--master-key-file",
                str(key_file(tmp_path)),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        ctx = ssl.create_default_context(cafile=str(ca.path))
        r = wait_serving(proc, f"https://127.0.0.1:{port}", log, verify=ctx)
        assert r.status_code == 200 and r.json() == {"ok": True}
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/v1/ping")  # plain HTTP is not served
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)


def test_master_key_generate(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    kid, material = path.read_text().split()
    again = cli("master-key", "generate", "--out", str(path))
    assert again.returncode == 1 and "not overwriting" in again.stderr
    assert path.read_text().split() == [kid, material]
    assert cli("master-key", "generate").stdout.split()[1] != material


def test_serve_refuses_a_missing_or_wrong_master_key(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    right, wrong = key_file(tmp_path, "right.key"), key_file(tmp_path, "wrong.key")
    assert cli("init", "--db", db).returncode == 0
    added = cli("devices", "--db", db, "add", "gw-1")
    assert added.returncode == 2 and "no master key configured" in added.stderr
    assert (
        cli("devices", "--db", db, "--master-key-file", str(right), "add", "gw-1").returncode == 0
    )
    before = (tmp_path / "cloud.db").read_bytes()
    r = cli("serve", "--db", db, "--port", str(free_port()))
    assert r.returncode == 2 and "no master key configured" in r.stderr
    assert "master-key generate" in r.stderr
    r = cli("serve", "--db", db, "--port", str(free_port()), "--master-key-file", str(wrong))
    assert r.returncode == 2 and "wrong master key" in r.stderr and "Traceback" not in r.stderr
    right.chmod(0o644)
    r = cli("serve", "--db", db, "--port", str(free_port()), "--master-key-file", str(right))
    assert r.returncode == 2 and "chmod 600" in r.stderr
    assert (tmp_path / "cloud.db").read_bytes() == before  # nothing was written


def test_rotation_while_serving(tmp_path: Path) -> None:
    """A receiver started before the rotation keeps authenticating the devices afterwards
    (it picks up the new key line from its file), and one started after it too."""
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    key = key_file(tmp_path)
    env = {"EDGEPIPE_CLOUD_DB": db, "EDGEPIPE_CLOUD_MASTER_KEY_FILE": str(key)}
    assert cli("init", env=env).returncode == 0
    secret = bytes.fromhex(cli("devices", "add", "gw-1", env=env).stdout.strip())
    old_id = key.read_text().split()[0]
    proc, url, log = start_serve(tmp_path, "--host", "127.0.0.1", env=env)
    try:
        dev = DeviceClient(url, "gw-1", secret)
        assert dev.upload([make_batch(1, series_readings(2))]).json()["acked"] == [1]
        r = cli("master-key", "rotate", env=env)
        assert r.returncode == 0, r.stderr
        assert "re-sealed 1 device secret" in r.stderr and old_id in r.stderr
        lines = key.read_text().splitlines()
        assert len(lines) == 2 and lines[0].split()[0] == old_id
        assert key.stat().st_mode & 0o777 == 0o600
        assert dev.upload([make_batch(2, series_readings(2))]).json()["acked"] == [2]
        dev.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    key.write_text(lines[1] + "\n")  # the old line is no longer needed
    proc, url, log = start_serve(tmp_path, "--host", "127.0.0.1", env=env)
    try:
        dev = DeviceClient(url, "gw-1", secret)
        assert dev.upload([make_batch(3, series_readings(2))]).json()["acked"] == [3]
        dev.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    assert secret.hex() not in log.read_text()  # the served log never shows a device secret


def test_rotate_needs_a_changeable_key(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    env = {
        "EDGEPIPE_CLOUD_DB": db,
        "EDGEPIPE_CLOUD_MASTER_KEY": cli("master-key", "generate").stdout,
    }
    assert cli("init", env=env).returncode == 0
    assert cli("devices", "add", "gw-1", env=env).returncode == 0
    r = cli("master-key", "rotate", env=env)
    assert r.returncode == 2 and "--keep-key" in r.stderr
    env["EDGEPIPE_CLOUD_MASTER_KEY"] += cli("master-key", "generate").stdout
    r = cli("master-key", "rotate", "--keep-key", env=env)
    assert r.returncode == 0 and "re-sealed 1 device secret" in r.stderr


# -- the command line as a shell user meets it ---------------------------------------------

PW = "correct horse battery"


def run_main(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *argv: str,
    stdin: str = "",
) -> tuple[int, str, str]:
    """``edgepipe-cloud ARGV`` in this process (its entry point, ``cloud.cli:main``)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def made_db(path: Path, key: Path | None = None, *, operator: str = "", device: str = "") -> str:
    url = f"sqlite:///{path}"
    mk = MasterKey.from_file(key) if key else None
    with open_backend(url, master_key=mk) as b:
        if operator:
            b.add_operator(operator, "$argon2id$not-a-real-hash")
        if device:
            b.add_device(device, os.urandom(32))
    return url


def contents(url: str, key: Path | None = None) -> tuple[list[str], list[str]]:
    """(operators, devices) of an existing database."""
    mk = MasterKey.from_file(key) if key else None
    with open_backend(url, master_key=mk, create=False) as b:
        return [o["name"] for o in b.list_operators()], [d["name"] for d in b.list_devices()]


# Each command, its arguments, stdin, and what it must have done to the database --db names.
COMMANDS = {
    "users add": (["users", "add"], ["ops", "--password-stdin"], PW + "\n"),
    "users list": (["users", "list"], [], ""),
    "users remove": (["users", "remove"], ["op0"], ""),
    "devices add": (["devices", "add"], ["gw-9"], ""),
    "devices list": (["devices", "list"], [], ""),
    "devices remove": (["devices", "remove"], ["d0"], ""),
    "master-key rotate": (["master-key", "rotate"], [], ""),
    "init": (["init"], [], ""),
}


def _place(where: str, words: list[str], leaf: list[str], db: str, key: str) -> list[str]:
    g = ["--db", db, "--master-key-file", key]
    if where == "before":  # edgepipe-cloud --db X users add a
        return [*g, *words, *leaf]
    if where == "between":  # edgepipe-cloud users --db X add a
        return [words[0], *g, *words[1:], *leaf]
    if where == "after":  # edgepipe-cloud users add a --db X
        return [*words, *leaf, *g]
    return [g[0], g[1], *words, *leaf, g[2], g[3]]  # "split": --db first, the key file last


@pytest.mark.parametrize("where", ["before", "between", "after", "split"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_global_options_work_at_every_level(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    where: str,
) -> None:
    """--db and --master-key-file take effect wherever they are, over a decoy database and
    a wrong key in the environment, and nothing appears in the current directory."""
    right, wrong = key_file(tmp_path, "right.key"), key_file(tmp_path, "wrong.key")
    target = made_db(tmp_path / "target.db", right, operator="op0", device="d0")
    decoy = made_db(tmp_path / "decoy.db", wrong, operator="op0", device="d0")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("EDGEPIPE_CLOUD_DB", decoy)
    monkeypatch.setenv("EDGEPIPE_CLOUD_MASTER_KEY_FILE", str(wrong))
    monkeypatch.delenv("EDGEPIPE_CLOUD_MASTER_KEY", raising=False)
    words, leaf, stdin = COMMANDS[command]
    db = f"sqlite:///{tmp_path / 'fresh.db'}" if command == "init" else target
    argv = _place(where, words, leaf, db, str(right))

    code, out, err = run_main(monkeypatch, capsys, *argv, stdin=stdin)

    assert code == 0, (argv, err)
    assert list(cwd.iterdir()) == []
    assert contents(decoy, wrong) == (["op0"], ["d0"])  # untouched
    expected = {
        "users add": (["op0", "ops"], ["d0"]),
        "users remove": ([], ["d0"]),
        "devices add": (["op0"], ["d0", "gw-9"]),
        "devices remove": (["op0"], []),
    }.get(command, (["op0"], ["d0"]))
    if command == "init":
        assert contents(db) == ([], [])
        return
    assert contents(target, right) == expected
    if command == "users list":
        assert [json.loads(line)["name"] for line in out.splitlines()] == ["op0"]
    if command == "devices list":
        assert [json.loads(line)["name"] for line in out.splitlines()] == ["d0"]
    if command == "devices add":
        assert len(bytes.fromhex(out.strip())) == 32
    if command == "master-key rotate":
        assert len(right.read_text().splitlines()) == 2 and "re-sealed 2" not in err
        assert len(wrong.read_text().splitlines()) == 1


def test_db_flag_beats_environment_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    a = made_db(tmp_path / "a.db", operator="in-a")
    b = made_db(tmp_path / "b.db", operator="in-b")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGEPIPE_CLOUD_DB", raising=False)

    def names(*argv: str) -> list[str]:
        code, out, err = run_main(monkeypatch, capsys, "users", "list", *argv)
        assert code == 0, err
        return [json.loads(line)["name"] for line in out.splitlines()]

    # The default: edgepipe-cloud.db in the current directory, created only by init.
    assert run_main(monkeypatch, capsys, "users", "list")[0] == 2
    assert not (tmp_path / "edgepipe-cloud.db").exists()
    assert run_main(monkeypatch, capsys, "init")[0] == 0
    assert (tmp_path / "edgepipe-cloud.db").is_file()
    assert names() == []
    monkeypatch.setenv("EDGEPIPE_CLOUD_DB", a)
    assert names() == ["in-a"]
    assert names("--db", b) == ["in-b"]
    assert names("--db", a, "--db", b) == ["in-b"]  # the last one wins
    monkeypatch.setenv("EDGEPIPE_CLOUD_DB", "")  # empty counts as unset
    assert names() == []


def _help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: the text is searchable
    code, out, err = run_main(monkeypatch, capsys, *argv)
    assert code == 0, err
    return " ".join(out.split())


HELP_PATHS = [
    [],
    ["serve"],
    ["init"],
    ["devices"],
    ["devices", "add"],
    ["devices", "list"],
    ["devices", "remove"],
    ["users"],
    ["users", "add"],
    ["users", "list"],
    ["users", "remove"],
    ["master-key"],
    ["master-key", "generate"],
    ["master-key", "rotate"],
]


@pytest.mark.parametrize("path", HELP_PATHS, ids=lambda p: " ".join(p) or "top")
def test_help_shows_exit_statuses_and_where_the_database_comes_from(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    path: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGEPIPE_CLOUD_DB", raising=False)
    monkeypatch.delenv("EDGEPIPE_CLOUD_MASTER_KEY_FILE", raising=False)
    monkeypatch.delenv("EDGEPIPE_CLOUD_MASTER_KEY", raising=False)
    text = _help(monkeypatch, capsys, *path, "--help")
    assert "exit status: 0 done 1 the command failed" in text
    assert "2 usage or configuration error" in text
    assert "else $EDGEPIPE_CLOUD_DB, else sqlite:///edgepipe-cloud.db" in text
    default = tmp_path / "edgepipe-cloud.db"
    assert f"Now: sqlite:///edgepipe-cloud.db (from the default: {default})" in text
    assert "Now: none configured" in text  # no master key
    monkeypatch.setenv("EDGEPIPE_CLOUD_DB", "postgresql://ops:s3cret@db.example/edge")
    monkeypatch.setenv("EDGEPIPE_CLOUD_MASTER_KEY", "k1 xyz")
    text = _help(monkeypatch, capsys, *path, "--help")
    assert "Now: postgresql://ops:***@db.example/edge (from $EDGEPIPE_CLOUD_DB)" in text
    assert "s3cret" not in text and "xyz" not in text
    assert "Now: the key lines in $EDGEPIPE_CLOUD_MASTER_KEY" in text
    # A flag anywhere on the line, even after --help, is what --help reports.
    text = _help(monkeypatch, capsys, *path, "--help", "--db", "sqlite:///x.db")
    assert "Now: sqlite:///x.db (from --db)" in text
    text = _help(monkeypatch, capsys, "--master-key-file", "/k/m.key", *path, "--help")
    assert "Now: /k/m.key (from --master-key-file)" in text
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = made_db(tmp_path / "c.db")
    for argv in (
        ["users", "list", "--bogus"],
        ["users", "add"],  # no name
        ["--db"],  # no value
        ["frobnicate"],
        ["devices"],  # no action
    ):
        code, _, err = run_main(monkeypatch, capsys, "--db", db, *argv)
        assert code == 2 and "usage: edgepipe-cloud" in err, argv


NEEDS_A_DATABASE = [
    ["users", "add", "ops", "--password-stdin"],
    ["users", "list"],
    ["users", "remove", "ops"],
    ["devices", "add", "gw-1"],
    ["devices", "list"],
    ["devices", "remove", "gw-1"],
    ["master-key", "rotate"],
    ["master-key", "rotate", "--keep-key"],
]


@pytest.mark.parametrize("argv", NEEDS_A_DATABASE, ids=" ".join)
def test_a_missing_database_is_refused_and_nothing_is_created(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    key = key_file(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("EDGEPIPE_CLOUD_DB", raising=False)
    monkeypatch.setenv("EDGEPIPE_CLOUD_MASTER_KEY_FILE", str(key))

    def refused(*extra: str) -> str:
        code, out, err = run_main(monkeypatch, capsys, *argv, *extra, stdin=PW + "\n")
        assert code == 2, err
        assert out == "" and "Traceback" not in err
        assert "--db URL" in err and "EDGEPIPE_CLOUD_DB=URL" in err
        assert "edgepipe-cloud init" in err
        assert list(work.iterdir()) == []  # nothing created, not even a directory
        return " ".join(err.split())

    err = refused()  # the default: edgepipe-cloud.db here
    assert f"no edgepipe-cloud database at {work / 'edgepipe-cloud.db'}: no such file" in err
    assert "the default: neither --db nor $EDGEPIPE_CLOUD_DB is set" in err
    elsewhere = work / "srv" / "cloud.db"
    err = refused("--db", f"sqlite:///{elsewhere}")
    assert f"at {elsewhere}: no such file" in err and "given with --db" in err
    monkeypatch.setenv("EDGEPIPE_CLOUD_DB", "sqlite:///typo.db")
    err = refused()
    assert f"at {work / 'typo.db'}" in err and "from $EDGEPIPE_CLOUD_DB" in err


def test_a_file_that_is_no_receiver_database_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    code, _, err = run_main(monkeypatch, capsys, "users", "list", "--db", f"sqlite:///{empty}")
    assert code == 2 and "holds no edgepipe-cloud tables" in err
    assert empty.stat().st_size == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    code, _, err = run_main(monkeypatch, capsys, "devices", "list", "--db", str(notes))
    assert code == 2 and "holds no edgepipe-cloud tables" in err and "Traceback" not in err
    assert notes.read_text() == "not a database\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "notes.txt"]


def test_a_missing_postgresql_schema_is_refused_and_not_created(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import psycopg

    with pg_schema_url() as url:
        schema = url.rsplit("schema=", 1)[1]
        code, _, err = run_main(monkeypatch, capsys, "users", "list", "--db", url)
        assert code == 2 and "holds no edgepipe-cloud tables" in err
        with psycopg.connect(PG_DSN) as conn:
            found = conn.execute(
                "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s",
                (schema,),
            ).fetchone()
        assert found == (0,)
        assert run_main(monkeypatch, capsys, "init", "--db", url)[0] == 0
        code, _, err = run_main(monkeypatch, capsys, "users", "list", "--db", url)
        assert code == 0, err


def test_init_creates_once_then_only_updates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'cloud.db'}"
    code, _, err = run_main(monkeypatch, capsys, "init", "--db", url)
    assert code == 0 and f"created the edgepipe-cloud database at {tmp_path / 'new'}" in err
    code, _, err = run_main(
        monkeypatch, capsys, "users", "add", "ops", "--password-stdin", "--db", url, stdin=PW
    )
    assert code == 0, err
    code, _, err = run_main(monkeypatch, capsys, "init", "--db", url)
    assert code == 0 and "up to date" in err
    assert contents(url) == (["ops"], [])


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
