"""Device secrets at rest in the receiver's database, on both backends: sealed under the
master key (a dump holds none), a sealed secret moved to another row or read with the wrong
key refused loudly, older key checks and plaintext secrets upgraded, key rotation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud import Backend, open_backend
from cloud._schema import SCHEMA_VERSION
from tests.helpers.cloud_client import (
    DeviceClient,
    LiveServer,
    last_rejection,
    make_batch,
    new_device,
    new_master_key,
    pg_schema_url,
    series_readings,
)


# -- device secrets at rest ------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of either kind, for tests that open and reopen it with keys."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
    else:
        with pg_schema_url() as url:
            yield url


def _dump(url: str) -> bytes:
    """What a stolen copy of the database holds: pg_dump of the schema, or the SQLite
    files themselves plus their SQL dump."""
    import sqlite3
    import subprocess
    from urllib.parse import parse_qs, urlsplit

    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        con = sqlite3.connect(path)
        try:
            text = "\n".join(con.iterdump()).encode()
        finally:
            con.close()
        files = [p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists()]
        return b"\n".join([text, *files])
    schema = parse_qs(urlsplit(url).query)["schema"][0]
    out = subprocess.run(
        ["pg_dump", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-n", schema],
        capture_output=True,
        check=True,
    )
    return out.stdout


def _sql(backend: Backend, sql: str, args: tuple = ()) -> list[tuple]:
    """Raw SQL on the backend's database (what someone with write access to it can do)."""
    with backend._write() as cur:  # type: ignore[attr-defined]
        cur.execute(backend._q(sql), args)  # type: ignore[attr-defined]
        return cur.fetchall() if cur.description else []


def _devices_rows(backend: Backend) -> list[tuple]:
    return _sql(backend, "SELECT name, secret, secret_key_id FROM devices ORDER BY name")


def _assert_not_in_dump(dump: bytes, secret: bytes) -> None:
    import base64

    for form in (
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ):
        assert form not in dump


def test_a_dump_of_the_database_holds_no_device_secret(db_url: str) -> None:
    key = new_master_key()
    with open_backend(db_url, master_key=key) as b:
        devices = [new_device(b) for _ in range(3)]
        assert all(b.get_device_secret(n) == s for n, s in devices)
        assert {r[2] for r in _devices_rows(b)} == {key.active_id}
    dump = _dump(db_url)
    assert devices[0][0].encode() in dump  # the dump is real: it holds the device names
    for _, secret in devices:
        _assert_not_in_dump(dump, secret)


def test_a_secret_copied_to_another_device_fails_clearly(backend: Backend) -> None:
    from cloud import SecretUnreadable

    (a, a_secret), (b, b_secret) = new_device(backend), new_device(backend)
    assert backend.get_device_secret(b) == b_secret  # cached now
    sealed, kid = _sql(backend, "SELECT secret, secret_key_id FROM devices WHERE name = ?", (a,))[0]
    _sql(
        backend,
        "UPDATE devices SET secret = ?, secret_key_id = ? WHERE name = ?",
        (sealed, kid, b),
    )
    with pytest.raises(SecretUnreadable, match=f"{b!r}.*another device") as exc:
        backend.get_device_secret(b)
    assert exc.value.device == b and a_secret.hex() not in str(exc.value)
    assert backend.get_device_secret(a) == a_secret  # the original row is untouched


def test_upload_for_a_device_with_a_moved_secret_is_refused_loudly(
    backend: Backend, server: LiveServer, operator: httpx.Client
) -> None:
    (a, a_secret), (b, _) = new_device(backend), new_device(backend)
    sealed, kid = _sql(backend, "SELECT secret, secret_key_id FROM devices WHERE name = ?", (a,))[0]
    _sql(
        backend,
        "UPDATE devices SET secret = ?, secret_key_id = ? WHERE name = ?",
        (sealed, kid, b),
    )
    # Signed with the secret the moved row holds: still refused, and not as a bad signature.
    dev = DeviceClient(server.url, b, a_secret)
    r = dev.upload([make_batch(1, series_readings(2))])
    dev.close()
    assert r.status_code == 500 and r.json()["error"] == "secret_unreadable"
    assert backend.count_readings(b) == 0
    assert last_rejection(operator, b)["reason"] == "secret_unreadable"
    assert backend.get_device(b)["last_error"].startswith("secret_unreadable")  # type: ignore[index]


def test_a_wrong_master_key_is_refused_at_start_and_writes_nothing(db_url: str) -> None:
    from cloud import MasterKeyError
    from cloud._secrets import generate_master_key_line

    line = generate_master_key_line()
    with open_backend(db_url, master_key=new_master_key(line)) as b:
        name, secret = new_device(b)
    with open_backend(db_url) as b:  # no key: the rest of the data stays reachable
        before = _devices_rows(b), _sql(b, "SELECT * FROM master_keys")
        with pytest.raises(MasterKeyError, match="no master key configured"):
            b.get_device_secret(name)
        with pytest.raises(MasterKeyError, match="no master key configured"):
            b.add_device("another", b"x" * 32)
    other = new_master_key()
    with pytest.raises(MasterKeyError, match="wrong master key"):
        open_backend(db_url, master_key=other)
    same_id = new_master_key(generate_master_key_line(line.split()[0]))
    with pytest.raises(MasterKeyError, match="key check fails"):
        open_backend(db_url, master_key=same_id)
    with open_backend(db_url) as b:
        assert (_devices_rows(b), _sql(b, "SELECT * FROM master_keys")) == before
    with open_backend(db_url, master_key=new_master_key(line)) as b:
        assert b.get_device_secret(name) == secret


def test_sealed_key_checks_of_older_databases_are_verified_then_rewritten(db_url: str) -> None:
    """Databases written before the key check was shared with the edge store hold a sealed
    text as their key check: a right key opens it and rewrites it as a key_check MAC, a
    wrong key is still refused, and nothing is written then."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from cloud import MasterKeyError
    from cloud._secrets import generate_master_key_line
    from protocol._keys import b64d, b64e, key_check

    line = generate_master_key_line()
    kid, key = line.split()[0], b64d(line.split()[1])
    with open_backend(db_url, master_key=new_master_key(line)) as b:
        name, secret = new_device(b)
        (check,) = _sql(b, "SELECT key_check FROM master_keys WHERE key_id = ?", (kid,))[0]
        assert b64d(check) == key_check(key, b"edgepipe-cloudkc")
        # the older format, written independently of the code that reads it
        k = kid.encode()
        aad = b"edgepipe-cloud/key-check/v1|%d:%s" % (len(k), k)
        nonce = b"\x07" * 12
        old = b64e(nonce + AESGCM(key).encrypt(nonce, b"edgepipe-cloud master key check", aad))
        _sql(b, "UPDATE master_keys SET key_check = ? WHERE key_id = ?", (old, kid))
    with pytest.raises(MasterKeyError, match="key check fails"):
        open_backend(db_url, master_key=new_master_key(generate_master_key_line(kid)))
    with open_backend(db_url) as b:
        assert _sql(b, "SELECT key_check FROM master_keys") == [(old,)]
    with open_backend(db_url, master_key=new_master_key(line)) as b:
        assert b.get_device_secret(name) == secret
        (now,) = _sql(b, "SELECT key_check FROM master_keys WHERE key_id = ?", (kid,))[0]
        assert b64d(now) == key_check(key, b"edgepipe-cloudkc")


def test_plaintext_secrets_are_sealed_on_first_start_with_a_key(db_url: str) -> None:
    key = new_master_key()
    with open_backend(db_url, master_key=key) as b:
        devices = [new_device(b) for _ in range(2)]
        # Back to what schema version 1 stored: secrets in plaintext hex, no key checks.
        for name, secret in devices:
            _sql(b, "UPDATE devices SET secret = ? WHERE name = ?", (secret.hex(), name))
        _sql(b, "ALTER TABLE devices DROP COLUMN secret_key_id")
        _sql(b, "DROP TABLE master_keys")
        _sql(b, "UPDATE schema_version SET version = 1")
    assert devices[0][1].hex().encode() in _dump(db_url)
    with open_backend(db_url) as b:  # without a key: schema upgraded, secrets left alone
        assert {r[2] for r in _devices_rows(b)} == {None}
    with open_backend(db_url, master_key=key) as b:
        rows = _devices_rows(b)
        assert {r[2] for r in rows} == {key.active_id}
        assert all(b.get_device_secret(n) == s for n, s in devices)
        assert _sql(b, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    with open_backend(db_url, master_key=key) as b:  # again: nothing left to do
        assert _devices_rows(b) == rows
    for _, secret in devices:
        _assert_not_in_dump(_dump(db_url), secret)


def test_rotation_reseals_every_secret_under_the_new_key(db_url: str) -> None:
    from cloud import MasterKeyError
    from cloud._secrets import generate_master_key_line

    old, new = generate_master_key_line(), generate_master_key_line()
    with open_backend(db_url, master_key=new_master_key(old)) as b:
        devices = [new_device(b) for _ in range(5)]
    both = new_master_key(old, new)  # the new line last: it is the active key
    with open_backend(db_url, master_key=both) as b:
        # Before and while re-sealing, both key ids are readable.
        late = new_device(b)
        assert {r[2] for r in _devices_rows(b)} == {old.split()[0], new.split()[0]}
        assert all(b.get_device_secret(n) == s for n, s in [*devices, late])
        assert b.rewrap_secrets(batch=2) == 5
        assert b.rewrap_secrets() == 0  # idempotent
        assert {r[2] for r in _devices_rows(b)} == {new.split()[0]}
        assert _sql(b, "SELECT key_id FROM master_keys") == [(new.split()[0],)]
    with open_backend(db_url, master_key=new_master_key(new)) as b:  # old line dropped
        assert all(b.get_device_secret(n) == s for n, s in [*devices, late])
    with pytest.raises(MasterKeyError, match="wrong master key"):
        open_backend(db_url, master_key=new_master_key(old))
