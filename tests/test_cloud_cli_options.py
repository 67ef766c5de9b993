"""edgepipe-cloud's command line as a shell user meets it: global options at every level
of the command, --db before the environment before the default, the help texts, usage
errors, and a database that is missing, not a receiver's or not yet made."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

from cloud import MasterKey, open_backend
from cloud.cli import main
from tests.helpers.cloud_cli import key_file
from tests.helpers.cloud_client import PG_DSN, pg_schema_url

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
