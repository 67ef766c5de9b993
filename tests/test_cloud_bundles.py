"""The receiver's bundle role and its device endpoints, against both backends (a real
SQLite file and a schema of the real PostgreSQL) through a real uvicorn server: bundles and
modules stored once, desired and reported state, the events timeline, and the signed
check-in and module download with every refusal (fixtures in conftest.py)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
import pytest

from cloud import Backend
from cloud._bundle_api import parse_report
from cloud._bundle_cli import BundleSourceError, read_bundle_source
from cloud._bundles import BundleVersionTaken, UnknownBundle
from cloud._errors import UnknownDevice
from core._clock import now_ms
from protocol import _bundle, _signing
from tests.helpers.bundles import KEY, filters_dir, make_bundle
from tests.helpers.cloud_client import LiveServer, new_device


def signed(
    server: LiveServer,
    name: str,
    secret: bytes,
    method: str,
    path: str,
    body: bytes = b"",
    **over: object,
) -> httpx.Response:
    h = _signing.signed_headers_v2(
        secret,
        name,
        path,
        body,
        timestamp=int(over.pop("timestamp", time.time())),  # type: ignore[call-overload]
        method=method,
        content_type="application/json",
        nonce=over.pop("nonce", None),  # type: ignore[arg-type]
    )
    h.update(over.pop("headers", {}))  # type: ignore[arg-type]
    return httpx.request(method, server.url + path, content=body, headers=h, timeout=30)


def check_in(
    server: LiveServer, name: str, secret: bytes, report: dict | None = None, **kw: object
):  # type: ignore[no-untyped-def]
    return signed(
        server, name, secret, "POST", "/v1/bundle", json.dumps(report or {}).encode(), **kw
    )


# -- the role -------------------------------------------------------------------------------------
def test_bundles_modules_desired_and_reported(backend: Backend, tmp_path: Path) -> None:
    name, _ = new_device(backend)
    first = make_bundle(backend, tmp_path / "a", modules=("validity", "deadband"))
    second = make_bundle(backend, tmp_path / "b", modules=("validity",), tag="two")
    assert second["version"] == first["version"] + 1 == backend.next_bundle_version() - 1
    assert first["new_modules"] == 2 and second["new_modules"] == 0  # stored once, fleet-wide
    listed = backend.list_bundles()
    assert [b["version"] for b in listed[:2]] == [second["version"], first["version"]]
    got = backend.get_bundle(first["version"])
    assert got is not None and len(got["modules"]) == 2
    m = _bundle.verify(
        got["manifest"],
        got["signature"],
        got["key_id"],
        trusted={KEY.id: KEY.public},
        now_ms=int(time.time() * 1000),
    )
    assert m.version == first["version"] and m.fleet == "default"
    # a version is never taken twice
    with pytest.raises(BundleVersionTaken):
        backend.add_bundle(m, got["manifest"], got["signature"], now=1)
    # desired
    assert backend.desired_bundle(name) is None
    with pytest.raises(UnknownBundle):
        backend.set_desired(name, 10**9, "x", now=1)
    with pytest.raises(UnknownDevice):
        backend.set_desired("no-such-device", first["version"], "x", now=1)
    backend.set_desired(name, first["version"], "canary", now=1000)
    assert backend.desired_bundle(name)["version"] == first["version"]  # type: ignore[index]
    sha = {e["path"]: e["sha256"] for e in got["modules"]}
    assert backend.module_for_device(name, sha["lib/deadband.wasm"]) is not None
    other, _ = new_device(backend)
    assert backend.module_for_device(other, sha["lib/deadband.wasm"]) is None  # not desired there
    # reported
    report = parse_report(
        json.dumps(
            {
                "active_version": first["version"],
                "applied_ms": 2000,
                "previous_version": None,
                "status": "applied",
                "version": first["version"],
                "health": {"validity": {"in": 10, "out": 9, "drops": {"range": 1}, "traps": {}}},
            }
        ).encode()
    )
    backend.report_bundle_state(name, report, now=2500)
    backend.report_bundle_state(name, report, now=2600)  # unchanged: no second event
    st = backend.bundle_state(name)
    assert st is not None and st["in_sync"] and st["active_version"] == first["version"]
    assert st["health"]["validity"]["drops"] == {"range": 1} and st["reported_ms"] == 2600
    events = backend.bundle_events(name)
    assert [(e["kind"], e["version"]) for e in events] == [
        ("desired", first["version"]),
        ("applied", first["version"]),
    ]
    assert any(
        s["device"] == other and s["desired_version"] is None for s in backend.bundle_states()
    )
    backend.remove_device(name)  # its state and events go with it
    assert backend.bundle_state(name) is None and backend.bundle_events(name) == []


def test_reports_are_bounded_and_typed() -> None:
    for bad in (
        b"[]",
        b"not json",
        b'{"status": "great"}',
        b'{"reason": "because"}',
        b'{"active_version": -1}',
        b'{"active_version": 1.5}',
        b'{"extra": 1}',
        json.dumps({"health": {f"s{i}": {} for i in range(65)}}).encode(),
        json.dumps({"health": {"s": {"drops": {f"r{i}": 1 for i in range(33)}}}}).encode(),
        json.dumps({"health": {"s": {"in": True}}}).encode(),
        json.dumps({"health": {"../s": {}}}).encode(),
        b'{"chain": "remote"}',
        b'{"chain": 1}',
    ):
        with pytest.raises(ValueError):
            parse_report(bad)
    assert parse_report(b"")["status"] is None
    assert parse_report(b'{"chain": "local", "active_version": 3}')["active_version"] == 3
    assert parse_report(json.dumps({"detail": "x" * 2000}).encode())["detail"] == "x" * 500


def test_a_filters_file_is_checked_before_it_is_signed(tmp_path: Path) -> None:
    path = filters_dir(tmp_path)
    text, mods = read_bundle_source(path)
    assert text == path.read_text() and [m.path for m, _ in mods] == ["lib/validity.wasm"]
    cases = {
        "version: 1\nchain:\n  - name: a\n    module: ../x.wasm\n": "'..'",
        "version: 1\nchain:\n  - name: a\n    module: /etc/x.wasm\n": "relative",
        "version: 1\nchain:\n  - name: a\n    module: lib/missing.wasm\n": "cannot read",
        "version: 2\nchain: []\n": "version",
        "version: 1\nchain: []\n": "chain",
        "version: 1\nchain:\n  - name: a\n    module: lib/validity.wasm\n    sha256: "
        + "0" * 64
        + "\n": "does not match",
        "chain: [": "not a YAML",
    }
    (tmp_path / "lib/text.wasm").write_text("not wasm")
    cases["chain:\n  - name: a\n    module: lib/text.wasm\n"] = "not a WebAssembly module"
    import wasmtime

    from tests.helpers.wasm import wat_module

    wasi = '(import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))'
    (tmp_path / "lib/wasi.wasm").write_bytes(wasmtime.wat2wasm(wat_module(imports=wasi)))
    cases["chain:\n  - name: a\n    module: lib/wasi.wasm\n"] = "not granted"
    for text, why in cases.items():
        path.write_text(text)
        with pytest.raises(BundleSourceError, match=why):
            read_bundle_source(path)


# -- the endpoints --------------------------------------------------------------------------------
def test_check_in_and_module_download(backend: Backend, server: LiveServer, tmp_path: Path) -> None:
    name, secret = new_device(backend)
    r = check_in(server, name, secret)
    assert r.status_code == 200, r.text
    assert r.json() == {"desired": None}
    made = make_bundle(backend, tmp_path, modules=("validity", "deadband"))
    v = made["version"]
    backend.set_desired(name, v, "test", now=1)
    r = check_in(server, name, secret, {"status": "waiting"})
    desired = r.json()["desired"]
    assert desired["version"] == v and desired["priority"] == "normal"
    data, sig, kid = _bundle.open_envelope(desired["envelope"])
    m = _bundle.verify(data, sig, kid, trusted={KEY.id: KEY.public}, now_ms=int(time.time() * 1000))
    for entry in m.modules:
        got = signed(server, name, secret, "GET", f"/v1/modules/{entry.sha256}")
        assert got.status_code == 200 and got.headers["content-type"] == "application/wasm"
        _bundle.check_module(entry, got.content)
    # another device may not fetch a module its own bundle does not name; nor a bad hash
    other, other_secret = new_device(backend)
    sha = m.modules[0].sha256
    assert signed(server, other, other_secret, "GET", f"/v1/modules/{sha}").status_code == 404
    assert signed(server, name, secret, "GET", "/v1/modules/" + "0" * 64).status_code == 404
    assert signed(server, name, secret, "GET", "/v1/modules/zz").status_code == 404
    # once the device reports the version active (or refused), no envelope again
    r = check_in(server, name, secret, {"active_version": v, "status": "applied", "version": v})
    assert r.json()["desired"] == {
        "version": v,
        "priority": "normal",
        "total_bytes": made["total_bytes"],
        "envelope": None,
    }
    r = check_in(
        server, name, secret, {"status": "failed", "version": v, "reason": "bad_signature"}
    )
    assert r.json()["desired"]["envelope"] is None
    st = backend.bundle_state(name)
    assert st is not None and st["status"] == "failed" and st["status_reason"] == "bad_signature"


def test_device_requests_are_authenticated(backend: Backend, server: LiveServer) -> None:
    name, secret = new_device(backend)
    body = b"{}"
    nonce = _signing.new_nonce()
    assert check_in(server, name, secret, nonce=nonce).status_code == 200
    replay = check_in(server, name, secret, nonce=nonce)
    assert replay.status_code == 401 and replay.json()["error"] == "replay"
    assert check_in(server, name, b"x" * 32).json()["error"] == "bad_signature"
    unknown = check_in(server, "nobody-here", secret)
    assert unknown.status_code == 401 and unknown.json()["error"] == "bad_signature"
    stale = check_in(server, name, secret, timestamp=time.time() - 3600)
    assert stale.status_code == 401 and stale.json()["error"] == "stale"
    # the body must be what was signed
    h = _signing.signed_headers_v2(
        secret,
        name,
        "/v1/bundle",
        body,
        timestamp=int(time.time()),
        content_type="application/json",
    )
    r = httpx.post(server.url + "/v1/bundle", content=b'{"status":"applied"}', headers=h)
    assert r.status_code == 401 and r.json()["error"] == "bad_signature"
    # v1 signatures, unsigned requests
    h1 = _signing.signed_headers(secret, name, "/v1/bundle", body, timestamp=int(time.time()))
    assert httpx.post(server.url + "/v1/bundle", content=body, headers=h1).status_code == 401
    assert httpx.post(server.url + "/v1/bundle", content=body).status_code == 401
    assert httpx.get(server.url + "/v1/modules/" + "0" * 64).status_code == 401
    # bounded
    big = json.dumps({"detail": "x" * 70_000}).encode()
    assert check_in(server, name, secret, {"detail": "x" * 70_000}).status_code == 413, len(big)
    bad = signed(server, name, secret, "POST", "/v1/bundle", b'{"status": "great"}')
    assert bad.status_code == 400 and "status" in bad.json()["detail"]


def test_a_device_in_a_loop_is_rate_limited(backend: Backend, server: LiveServer) -> None:
    name, secret = new_device(backend)
    codes = [check_in(server, name, secret).status_code for _ in range(14)]
    assert codes[:10] == [200] * 10 and 429 in codes[10:]
    other, other_secret = new_device(backend)
    assert check_in(server, other, other_secret).status_code == 200  # per device


def test_module_content_is_addressed(backend: Backend) -> None:
    data = b"\0asm\1\0\0\0" + b"x" * 10
    sha = hashlib.sha256(data).hexdigest()
    assert backend.put_module(sha, data) in (True, False)
    assert backend.put_module(sha, data) is False and backend.has_module(sha)


def test_operators_read_bundles_and_a_device_timeline(
    backend: Backend, server: LiveServer, operator: httpx.Client, tmp_path: Path
) -> None:
    name, _ = new_device(backend)
    made = make_bundle(backend, tmp_path)
    backend.set_desired(name, made["version"], "canary", now=5)
    doc = operator.get("/v1/bundles").json()
    assert doc["bundles"][0]["version"] == made["version"] and "manifest" not in doc["bundles"][0]
    assert any(
        d["device"] == name and d["desired_version"] == made["version"] for d in doc["devices"]
    )
    one = operator.get(f"/v1/devices/{name}/bundle").json()
    assert one["state"]["desired_reason"] == "canary"
    assert [e["kind"] for e in one["events"]] == ["desired"]
    assert operator.get(f"/v1/devices/{name}/bundle", params={"since": 6}).json()["events"] == []
    assert operator.get(f"/v1/devices/{name}/bundle", params={"since": "x"}).status_code == 400
    assert operator.get("/v1/devices/nobody-at-all/bundle").status_code == 404
    assert httpx.get(server.url + "/v1/bundles").status_code == 401  # operators only


def test_reissue_signs_an_earlier_chain_as_the_next_version(
    backend: Backend, tmp_path: Path
) -> None:
    from cloud._bundle_cli import reissue_bundle

    first = make_bundle(backend, tmp_path / "a", tag="first")
    make_bundle(backend, tmp_path / "b", tag="second")
    again = reissue_bundle(
        backend, KEY, first["version"], fleet="default", priority="urgent", valid_days=1
    )
    assert again["version"] == backend.next_bundle_version() - 1 > first["version"]
    assert again["from_version"] == first["version"] and again["priority"] == "urgent"
    old, new = backend.get_bundle(first["version"]), backend.get_bundle(again["version"])
    assert old is not None and new is not None and old["modules"] == new["modules"]
    m_old = _bundle.decode_manifest(old["manifest"])
    m_new = _bundle.decode_manifest(new["manifest"])
    assert m_new.filters_text == m_old.filters_text and m_new.modules == m_old.modules
    with pytest.raises(UnknownBundle):
        reissue_bundle(backend, KEY, 10**9, fleet="default", priority="normal", valid_days=1)


def test_a_local_bundle_is_stored_and_shown_as_the_local_chain(
    backend: Backend, tmp_path: Path
) -> None:
    from cloud._bundle_cli import create_local_bundle

    name, _ = new_device(backend)
    made = create_local_bundle(backend, KEY, fleet="default", priority="urgent", valid_days=1)
    assert made["chain"] == "local" and made["modules"] == 0 and made["total_bytes"] == 0
    got = backend.get_bundle(made["version"])
    assert got is not None and got["modules"] == [] and got["filters_sha256"] == "local"
    m = _bundle.verify(
        got["manifest"], got["signature"], got["key_id"], trusted={KEY.id: KEY.public},
        now_ms=now_ms(), fleet="default",
    )  # fmt: skip
    assert m.is_local and m.priority == "urgent"
    # a device's state says which chain its active version runs
    other = make_bundle(backend, tmp_path / "c", tag="chain-marker")
    backend.set_desired(name, other["version"], "test", now=now_ms())
    rep = {"active_version": other["version"], "previous_version": None, "applied_ms": 1,
           "status": "applied", "version": other["version"], "reason": None, "detail": None,
           "health": None}  # fmt: skip
    backend.report_bundle_state(name, rep, now=now_ms())
    assert backend.bundle_state(name)["chain"] == "bundle"
    rep.update(active_version=made["version"], version=made["version"])
    backend.report_bundle_state(name, rep, now=now_ms())
    assert backend.bundle_state(name)["chain"] == "local"


def test_a_schema_4_database_gains_the_bundle_tables(tmp_path: Path) -> None:
    import sqlite3

    from cloud import open_backend
    from cloud._schema import SCHEMA_VERSION

    url = f"sqlite:///{tmp_path / 'cloud.db'}"
    open_backend(url).close()
    con = sqlite3.connect(tmp_path / "cloud.db")
    for table in ("bundle_events", "device_bundle", "bundle_files", "bundles", "bundle_modules"):
        con.execute(f"DROP TABLE {table}")  # what a schema-4 database is
    for table in ("rollout_events", "rollout_devices", "rollouts", "device_labels"):
        con.execute(f"DROP TABLE IF EXISTS {table}")
    con.execute("UPDATE schema_version SET version = 4")
    con.commit()
    con.close()
    with open_backend(url) as b:
        assert b.list_bundles() == [] and b.next_bundle_version() == 1
    con = sqlite3.connect(tmp_path / "cloud.db")
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    con.close()
