"""The receiver's contract, run against both backends (real SQLite file, real PostgreSQL)
through a real uvicorn server and real HTTP."""

from __future__ import annotations

import concurrent.futures
import gzip
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
import zstandard

from cloud import Backend, ReadingsQuery, SequenceConflict, Settings, create_app, open_backend
from cloud._app import rejection_for
from cloud._wire import decode_upload
from protocol import _signing
from tests.helpers.cloud_client import (
    PATH,
    DeviceClient,
    LiveServer,
    encode,
    make_batch,
    new_device,
    new_master_key,
    open_test_backend,
    pg_schema_url,
    series_readings,
)

TOKEN = "operator-token-for-tests"
MAX_BODY = 256 * 1024
MAX_DECOMPRESSED = 2 * 1024 * 1024


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    with open_test_backend(request.param, tmp_path_factory.mktemp("cloud")) as b:
        yield b


@pytest.fixture(scope="module")
def server(backend: Backend) -> Iterator[LiveServer]:
    settings = Settings(
        api_token=TOKEN,
        max_body_bytes=MAX_BODY,
        max_decompressed_bytes=MAX_DECOMPRESSED,
        max_inflight_per_device=8,  # the concurrency tests upload 6 at once from one device
    )
    with LiveServer(create_app(settings, backend=backend)) as s:
        yield s


@pytest.fixture
def device(backend: Backend, server: LiveServer) -> Iterator[DeviceClient]:
    name, secret = new_device(backend)
    client = DeviceClient(server.url, name, secret)
    yield client
    client.close()


@pytest.fixture
def operator(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as c:
        yield c


def _stored(backend: Backend, device: DeviceClient) -> int:
    return backend.count_readings(device.name)


def _last_rejection(operator: httpx.Client, device: str | None = None) -> dict:
    params = {"limit": 1} | ({"device": device} if device else {})
    rows = operator.get("/v1/rejections", params=params).json()["rejections"]
    return rows[0]


# -- happy path ------------------------------------------------------------------------------
def test_ping(server: LiveServer) -> None:
    r = httpx.get(server.url + "/v1/ping")
    assert r.status_code == 200 and r.json() == {"ok": True}


@pytest.mark.parametrize("encoding", ["zstd", "gzip", "identity"])
def test_upload_stores_readings_and_status(
    backend: Backend, device: DeviceClient, operator: httpx.Client, encoding: str
) -> None:
    device.encoding = encoding
    b1 = make_batch(1, series_readings(10))
    b2 = make_batch(
        2,
        [("sensor-2", "hum", {"room": "lab"}, 1_700_000_100_000, 55.5, 1)]
        + series_readings(5, start=1_700_000_200_000),
    )
    status = {
        "backlog_batches": 3,
        "backlog_readings": 1200,
        "oldest_unsynced_ms": 1_700_000_000_000,
        "dead_letters": 1,
        "link": "cellular",
    }
    dl = [
        {
            "seq": 7,
            "ts": 1_700_000_000_500,
            "topic": "sensors/x/temp",
            "stage": "decode",
            "reason": "not a number",
            "size": 12,
        }
    ]
    r = device.upload([b2, b1], status=status, dead_letters=dl, link="cellular")
    assert r.status_code == 200, r.text
    assert r.json() == {"acked": [1, 2], "duplicates": []}
    assert _stored(backend, device) == 16

    d = operator.get(f"/v1/devices/{device.name}").json()
    assert d["link"] == "cellular"
    assert d["reported"] == status
    assert d["last_seq"] == 2
    assert d["last_sync_ms"] is not None and d["last_seen_ms"] is not None
    assert d["today"]["readings"] == 16 and d["today"]["uploads"] == 1
    assert d["today"]["bytes"] > 0
    assert device.name in [x["name"] for x in operator.get("/v1/devices").json()["devices"]]

    metrics = operator.get(f"/v1/devices/{device.name}/metrics").json()["metrics"]
    assert {(m["source"], m["metric"], m["count"]) for m in metrics} == {
        ("sensor-1", "temp", 15),
        ("sensor-2", "hum", 1),
    }
    hum = next(m for m in metrics if m["metric"] == "hum")
    assert hum["tags"] == {"room": "lab"}

    rows = operator.get(
        "/v1/readings", params={"device": device.name, "metric": "hum", "since": 0}
    ).json()["rows"]
    assert rows == [
        {
            "source": "sensor-2",
            "metric": "hum",
            "tags": {"room": "lab"},
            "ts": 1_700_000_100_000,
            "value": 55.5,
            "flags": 1,
        }
    ]
    dls = operator.get("/v1/dead-letters", params={"device": device.name}).json()["dead_letters"]
    assert [(x["seq"], x["topic"], x["stage"], x["reason"], x["size"]) for x in dls] == [
        (7, "sensors/x/temp", "decode", "not a number", 12)
    ]


def test_retry_is_acked_as_duplicate_and_not_doubled(
    backend: Backend, device: DeviceClient, operator: httpx.Client
) -> None:
    batches = [
        make_batch(1, series_readings(20)),
        make_batch(2, series_readings(5, start=1_700_000_000_002)),
    ]
    assert device.upload(batches).json() == {"acked": [1, 2], "duplicates": []}
    # A retry after a lost response: same batches, new nonce, plus one new batch.
    batches.append(make_batch(3, series_readings(3, start=1_700_000_000_003)))
    r = device.upload(batches)
    assert r.status_code == 200
    assert r.json() == {"acked": [1, 2, 3], "duplicates": [1, 2]}
    assert _stored(backend, device) == 28
    assert operator.get(f"/v1/devices/{device.name}").json()["last_seq"] == 3


def test_order_is_kept(backend: Backend, device: DeviceClient, operator: httpx.Client) -> None:
    start = 1_700_000_000_000
    batches = [make_batch(s, series_readings(4, start=start + s * 10_000)) for s in (3, 1, 2)]
    assert device.upload(batches).json()["acked"] == [1, 2, 3]
    rows = operator.get(
        "/v1/readings", params={"device": device.name, "since": start, "limit": 100}
    ).json()["rows"]
    ts = [r["ts"] for r in rows]
    assert len(ts) == 12 and ts == sorted(ts)


def test_reused_seq_with_other_content_is_refused(
    backend: Backend, device: DeviceClient, operator: httpx.Client
) -> None:
    assert device.upload([make_batch(5, series_readings(3))]).status_code == 200
    other = make_batch(5, series_readings(4))
    r = device.upload([make_batch(6, series_readings(2)), other])
    assert r.status_code == 409
    assert r.json()["error"] == "sequence_conflict" and r.json()["seq"] == 5
    assert _stored(backend, device) == 3  # batch 6 of the refused request is not stored either
    assert _last_rejection(operator, device.name)["reason"] == "sequence_conflict"
    assert operator.get(f"/v1/devices/{device.name}").json()["last_seq"] == 5


def test_conflict_within_one_request(backend: Backend, device: DeviceClient) -> None:
    r = device.upload([make_batch(1, series_readings(1)), make_batch(1, series_readings(2))])
    assert r.status_code == 409
    assert _stored(backend, device) == 0


def test_concurrent_identical_uploads_store_once(backend: Backend, device: DeviceClient) -> None:
    batches = [
        make_batch(s, series_readings(50, start=1_700_000_000_000 + s * 100_000))
        for s in range(1, 4)
    ]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: device.upload(batches), range(6)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert all(r.json()["acked"] == [1, 2, 3] for r in results)
    assert sum(len(r.json()["duplicates"]) == 0 for r in results) == 1
    assert _stored(backend, device) == 150


# -- refusals: right status, nothing stored, logged -----------------------------------------
def _refused(
    backend: Backend,
    operator: httpx.Client,
    device: DeviceClient,
    r: httpx.Response,
    status: int,
    code: str,
    *,
    logged_device: str | None = "self",
    logged: bool = True,
) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and body["detail"]
    assert device.secret.hex() not in r.text
    assert _stored(backend, device) == 0
    if not logged:  # not authenticated: counted in memory, nothing written per request
        rows = operator.get("/v1/rejections", params={"device": device.name}).json()
        assert rows["rejections"] == []
        assert operator.get(f"/v1/devices/{device.name}").json()["last_error"] is None
        counts = operator.get("/v1/receiver").json()["uploads"]["refused_unauthenticated"]
        assert counts[code] >= 1
        return
    rej = _last_rejection(operator)
    assert rej["reason"] == code
    assert rej["device"] == (device.name if logged_device == "self" else logged_device)
    assert rej["remote"] == "127.0.0.1"


def test_wrong_secret(backend: Backend, device: DeviceClient, operator: httpx.Client) -> None:
    r = device.upload([make_batch(1, series_readings(3))], secret=b"x" * 32)
    _refused(backend, operator, device, r, 401, "bad_signature", logged=False)
    status = operator.get(f"/v1/devices/{device.name}").json()
    assert status["last_error"] is None  # an unverified request is not the device
    assert status["last_seen_ms"] is None


def test_forged_body(backend: Backend, device: DeviceClient, operator: httpx.Client) -> None:
    genuine = encode(device.body([make_batch(1, series_readings(3))]), "zstd")
    forged = encode(device.body([make_batch(1, series_readings(30))]), "zstd")
    r = device.post_raw(forged, signed_body=genuine)
    _refused(backend, operator, device, r, 401, "bad_signature", logged=False)


def test_signature_of_another_path_or_device(
    backend: Backend, device: DeviceClient, operator: httpx.Client
) -> None:
    sent = encode(device.body([make_batch(1, series_readings(3))]), "zstd")
    other_name, _ = new_device(backend)
    r = device.post_raw(sent, headers={"X-Edgepipe-Device": other_name})
    assert r.status_code == 401 and r.json()["error"] == "bad_signature"
    r = device.post_raw(sent, headers={"X-Edgepipe-Signature": "v1=" + "0" * 64})
    _refused(backend, operator, device, r, 401, "bad_signature", logged=False)
    r = device.post_raw(sent, headers={"X-Edgepipe-Signature": "v2=" + "0" * 64})
    _refused(backend, operator, device, r, 401, "bad_signature", logged=False)


def test_unknown_device(backend: Backend, server: LiveServer, operator: httpx.Client) -> None:
    ghost = DeviceClient(server.url, "no-such-device", b"k" * 32)
    r = ghost.upload([make_batch(1, series_readings(3))])
    # The same answer as a bad signature (device names cannot be enumerated), nothing logged.
    assert r.status_code == 401 and r.json()["error"] == "bad_signature"
    rows = operator.get("/v1/rejections", params={"limit": 1000}).json()["rejections"]
    assert not any("no-such-device" in (row["detail"] or "") for row in rows)
    counts = operator.get("/v1/receiver").json()["uploads"]["refused_unauthenticated"]
    assert counts["unknown_device"] >= 1
    ghost.close()


def test_replayed_nonce(backend: Backend, device: DeviceClient, operator: httpx.Client) -> None:
    sent = encode(device.body([make_batch(1, series_readings(3))]), "zstd")
    nonce, ts = "ab" * 16, int(time.time())
    assert device.post_raw(sent, nonce=nonce, timestamp=ts).status_code == 200
    r = device.post_raw(sent, nonce=nonce, timestamp=ts)
    assert r.status_code == 401 and r.json()["error"] == "replay"
    assert _stored(backend, device) == 3
    assert _last_rejection(operator, device.name)["reason"] == "replay"


@pytest.mark.parametrize("skew", [-305, 305, -10_000])  # 5 s clear of the 300 s edge
def test_stale_timestamp(
    backend: Backend, device: DeviceClient, operator: httpx.Client, skew: int
) -> None:
    r = device.upload([make_batch(1, series_readings(3))], timestamp=int(time.time()) + skew)
    _refused(backend, operator, device, r, 401, "stale")


def test_missing_signature_headers(
    backend: Backend, device: DeviceClient, operator: httpx.Client
) -> None:
    sent = encode(device.body([make_batch(1, series_readings(3))]), "zstd")
    r = device.http.post(
        PATH,
        content=sent,
        headers={"X-Edgepipe-Device": device.name, "Content-Encoding": "zstd"},
    )
    assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
    assert "X-Edgepipe-Timestamp" in r.json()["detail"]
    assert _stored(backend, device) == 0


def test_oversized_body_by_content_length(
    backend: Backend, device: DeviceClient, operator: httpx.Client
) -> None:
    sent = b"\0" * (MAX_BODY + 1)
    r = device.post_raw(sent, encoding="identity")  # signed (v2): checked before reading
    _refused(backend, operator, device, r, 413, "too_large")
    device.version = 1  # unverifiable before its body: refused unread, counted only
    r = device.post_raw(sent, encoding="identity")
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    rows = operator.get("/v1/rejections", params={"device": device.name}).json()["rejections"]
    assert len(rows) == 1  # only the signed one


def test_oversized_body_streamed_without_length(
    backend: Backend, device: DeviceClient, operator: httpx.Client
) -> None:
    sent = b"\0" * (MAX_BODY * 2)
    headers = {
        "X-Edgepipe-Device": device.name,
        "X-Edgepipe-Timestamp": str(int(time.time())),
        "X-Edgepipe-Nonce": "cd" * 16,
        "X-Edgepipe-Signature": "v1=" + "0" * 64,
        "Content-Encoding": "identity",
    }

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(sent), 16384):
            yield sent[i : i + 16384]

    r = device.http.post(PATH, content=chunks(), headers=headers)
    _refused(backend, operator, device, r, 413, "too_large", logged=False)  # v1: unverified
    # Signed (v2), the same body is refused as the device's own oversized upload: logged.
    h2 = _signing.signed_headers_v2(
        device.secret, device.name, PATH, sent, timestamp=int(time.time()), encoding="identity"
    )
    r = device.http.post(PATH, content=chunks(), headers=h2)
    _refused(backend, operator, device, r, 413, "too_large")


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
def test_zip_bomb(
    backend: Backend, device: DeviceClient, operator: httpx.Client, encoding: str
) -> None:
    # A valid msgpack map whose bin would be 20 MB once inflated, sent as a few KB.
    inflated = msgpack.packb({"v": 1, "device": device.name, "batches": [b"\0" * 20_000_000]})
    sent = (
        zstandard.ZstdCompressor(level=19).compress(inflated)
        if encoding == "zstd"
        else gzip.compress(inflated, 9)
    )
    assert len(sent) < MAX_BODY
    r = device.post_raw(sent, encoding=encoding)
    _refused(backend, operator, device, r, 413, "too_large")
    assert "decompressed" in r.json()["detail"]


def test_unsupported_encoding(
    backend: Backend, device: DeviceClient, operator: httpx.Client
) -> None:
    sent = encode(device.body([make_batch(1, series_readings(3))]), "identity")
    r = device.post_raw(sent, encoding="br")
    _refused(backend, operator, device, r, 415, "unsupported_encoding", logged=False)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"\xc1garbage", "not valid msgpack"),
        (msgpack.packb([1, 2, 3]), "expected a map"),
        (msgpack.packb({"v": 2, "batches": []}), "version"),
    ],
)
def test_undecodable_body(
    backend: Backend, device: DeviceClient, operator: httpx.Client, raw: bytes, needle: str
) -> None:
    r = device.post_raw(encode(raw, "zstd"))
    _refused(backend, operator, device, r, 400, "bad_body")
    assert needle in r.json()["detail"]


def test_corrupt_compression(
    backend: Backend, device: DeviceClient, operator: httpx.Client
) -> None:
    r = device.post_raw(b"\x28\xb5\x2f\xfd garbage", encoding="zstd")
    _refused(backend, operator, device, r, 400, "bad_body")
    r = device.post_raw(b"\x1f\x8b garbage", encoding="gzip")
    _refused(backend, operator, device, r, 400, "bad_body")


def test_bad_batch_shape_names_the_field(
    backend: Backend, device: DeviceClient, operator: httpx.Client
) -> None:
    good = make_batch(1, series_readings(3))
    bad = msgpack.packb(
        {
            "seq": 2,
            "series": [["s", "m", None]],
            "sid": [0, 0],
            "ts": [1_700_000_000_001, 1_700_000_000_002],
            "val": [1.0, "x"],
            "flags": [0, 0],
        }
    )
    r = device.upload([good, bad])
    _refused(backend, operator, device, r, 400, "bad_body")
    assert r.json()["detail"].startswith("batches[1].val[1]")
    r = device.upload([good], device="someone-else")
    _refused(backend, operator, device, r, 400, "device_mismatch")
    status = operator.get(f"/v1/devices/{device.name}").json()
    assert status["last_seen_ms"] is not None and status["last_sync_ms"] is None
    assert status["last_error"].startswith("device_mismatch")


# -- read API ----------------------------------------------------------------------------------
def test_read_api_needs_operator_credentials(device: DeviceClient, server: LiveServer) -> None:
    assert device.upload([make_batch(1, series_readings(3))]).status_code == 200
    paths = [
        "/v1/devices",
        f"/v1/devices/{device.name}",
        f"/v1/devices/{device.name}/metrics",
        f"/v1/readings?device={device.name}",
        "/v1/rejections",
        "/v1/dead-letters",
    ]
    from protocol import _signing

    for path in paths:
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", path
        r = httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, path
        # A device's valid signature is not an operator credential.
        signed = _signing.signed_headers(
            device.secret,
            device.name,
            path.split("?")[0],
            b"",
            timestamp=int(time.time()),
            method="GET",
        )
        r = httpx.get(server.url + path, headers=signed)
        assert r.status_code == 401, path
        r = httpx.get(server.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, path


def test_read_api_errors(operator: httpx.Client) -> None:
    assert operator.get("/v1/devices/nope").status_code == 404
    assert operator.get("/v1/devices/nope/metrics").status_code == 404
    assert operator.get("/v1/readings", params={"device": "nope"}).status_code == 404
    r = operator.get("/v1/readings")
    assert r.status_code == 400 and r.json()["error"] == "bad_query"
    r = operator.get("/v1/readings", params={"device": "x", "limit": "lots"})
    assert r.status_code == 400 and "limit" in r.json()["detail"]
    assert operator.get("/v1/readings", params={"device": "x", "limit": 0}).status_code == 400
    assert operator.get("/v1/nothing-here").json()["error"] == "not_found"


def test_downsampling_is_bounded_and_exact(
    backend: Backend, device: DeviceClient, operator: httpx.Client
) -> None:
    start = 1_600_000_000_000
    # Two series, 3000 readings each, one per second; values 0..2999.
    batches = [
        make_batch(
            k + 1,
            [
                ("a", "temp", None, start + i * 1000, float(i), 0)
                for i in range(k * 1000, k * 1000 + 1000)
            ]
            + [
                ("b", "temp", None, start + i * 1000, -float(i), 0)
                for i in range(k * 1000, k * 1000 + 1000)
            ],
        )
        for k in range(3)
    ]
    assert device.upload(batches).status_code == 200
    params = {"device": device.name, "since": start, "until": start + 3_000_000}

    raw = operator.get("/v1/readings", params=params | {"limit": 10_000}).json()
    assert raw["step"] is None and len(raw["rows"]) == 6000 and not raw["truncated"]

    auto = operator.get("/v1/readings", params=params | {"limit": 100}).json()
    assert auto["step"] is not None and 0 < len(auto["rows"]) <= 100
    assert sum(r["count"] for r in auto["rows"]) == 6000
    a_rows = [r for r in auto["rows"] if r["source"] == "a"]
    assert [r["ts"] for r in a_rows] == sorted(r["ts"] for r in a_rows)
    assert min(r["min"] for r in a_rows) == 0.0 and max(r["max"] for r in a_rows) == 2999.0

    stepped = operator.get("/v1/readings", params=params | {"step": 60_000, "limit": 1000}).json()
    assert stepped["step"] == 60_000 and len(stepped["rows"]) == 100  # 50 buckets x 2 series
    first_a = next(r for r in stepped["rows"] if r["source"] == "a")
    assert first_a == {
        "source": "a",
        "metric": "temp",
        "tags": None,
        "ts": start,
        "avg": 29.5,
        "min": 0.0,
        "max": 59.0,
        "count": 60,
    }

    small = operator.get("/v1/readings", params=params | {"step": 1000, "limit": 10}).json()
    assert len(small["rows"]) == 10 and small["truncated"]


def test_rejection_log_paging(device: DeviceClient, operator: httpx.Client) -> None:
    for _ in range(3):  # stale but authentic: logged for the device
        device.upload([make_batch(1, series_readings(1))], timestamp=int(time.time()) - 10_000)
    rows = operator.get("/v1/rejections", params={"device": device.name}).json()["rejections"]
    assert len(rows) == 3
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids, reverse=True)
    older = operator.get("/v1/rejections", params={"device": device.name, "before": ids[0]}).json()[
        "rejections"
    ]
    assert [r["id"] for r in older] == ids[1:]


# -- the backend contract without HTTP ------------------------------------------------------
def test_backend_conflict_raises_and_stores_nothing(backend: Backend) -> None:
    name, _ = new_device(backend)

    def upload(*batches: bytes):
        return decode_upload(
            msgpack.packb({"v": 1, "device": name, "batches": list(batches)}), name
        )

    now = int(time.time() * 1000)
    kw = {"link": "ethernet", "nbytes": 10, "nonce_expires": now + 600_000, "now": now}
    r = backend.ingest(upload(make_batch(1, series_readings(2))), nonce="1" * 32, **kw)
    assert (r.acked, r.duplicates, r.readings) == ([1], [], 2)
    with pytest.raises(SequenceConflict) as exc:
        backend.ingest(
            upload(make_batch(2, series_readings(1)), make_batch(1, series_readings(3))),
            nonce="2" * 32,
            **kw,
        )
    assert exc.value.seq == 1 and exc.value.device == name
    assert rejection_for(exc.value, upload=True).status == 409  # type: ignore[union-attr]
    assert backend.count_readings(name) == 2
    assert not backend.nonce_seen(name, "2" * 32, now)  # the refused request left no nonce
    assert backend.nonce_seen(name, "1" * 32, now)
    assert not backend.nonce_seen(name, "1" * 32, now + 700_000)  # expired
    q = backend.readings(ReadingsQuery(name, since=0, until=2**62))
    assert [row["value"] for row in q["rows"]] == [0.0, 1.0]
    assert backend.remove_device(name) and backend.get_device(name) is None
    assert backend.count_readings(name) == 0
    assert not backend.remove_device(name)


def test_schema_init_is_idempotent(backend: Backend) -> None:
    name, secret = new_device(backend)
    backend.init()
    backend.init()
    assert backend.get_device_secret(name) == secret  # nothing stored was dropped


def test_sqlite_reopen_keeps_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    key = new_master_key()
    with open_backend(url, master_key=key) as b:
        name, secret = new_device(b)
    with open_backend(url, master_key=key) as b:
        assert b.get_device_secret(name) == secret


def test_responses_match_the_openapi_document(device: DeviceClient, operator: httpx.Client) -> None:
    from jsonschema import Draft202012Validator

    doc = operator.get("/openapi.json").json()

    def check(schema: dict, instance: object) -> None:
        Draft202012Validator({**schema, "components": doc["components"]}).validate(instance)

    def response_schema(path: str, method: str, status: str) -> dict:
        resp = doc["paths"][path][method]["responses"][status]
        if "$ref" in resp:
            resp = doc["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
        return resp["content"]["application/json"]["schema"]

    ok = device.upload(
        [make_batch(1, series_readings(5))],
        dead_letters=[{"seq": 1, "ts": 1, "topic": "t", "stage": None, "reason": "r", "size": 1}],
    )
    check(response_schema("/v1/batches", "post", "200"), ok.json())
    conflict = device.upload([make_batch(1, series_readings(6))])
    check(response_schema("/v1/batches", "post", "409"), conflict.json())
    stale = device.upload([make_batch(2, series_readings(6))], timestamp=1)
    check(response_schema("/v1/batches", "post", "401"), stale.json())
    for path, url, params in [
        ("/v1/devices", "/v1/devices", {}),
        ("/v1/devices/{name}", f"/v1/devices/{device.name}", {}),
        ("/v1/devices/{name}/metrics", f"/v1/devices/{device.name}/metrics", {}),
        ("/v1/readings", "/v1/readings", {"device": device.name, "since": 0}),
        ("/v1/readings", "/v1/readings", {"device": device.name, "since": 0, "step": 10}),
        ("/v1/rejections", "/v1/rejections", {}),
        ("/v1/dead-letters", "/v1/dead-letters", {}),
    ]:
        r = operator.get(url, params=params)
        assert r.status_code == 200
        check(response_schema(path, "get", "200"), r.json())


def test_overload_answers_503_with_retry_after(backend: Backend) -> None:
    import threading

    # A v1 upload's body is read before it can be verified, on one of max_unverified_bodies
    # places: with one, a second v1 upload is turned away while the first is being received.
    settings = Settings(api_token=TOKEN, max_unverified_bodies=1, retry_after_s=7)
    name, secret = new_device(backend)
    with LiveServer(create_app(settings, backend=backend)) as server:
        dev = DeviceClient(server.url, name, secret, version=1)
        release = threading.Event()
        sent = encode(dev.body([make_batch(1, series_readings(3))]), "zstd")

        def slow_body() -> Iterator[bytes]:
            yield sent[:10]
            release.wait(30)  # the first upload stays in progress until the second is answered
            yield sent[10:]

        first: list[httpx.Response] = []
        headers = {
            "Content-Type": "application/vnd.edgepipe.batches+msgpack",
            "Content-Encoding": "zstd",
        }
        from protocol import _signing

        headers |= _signing.signed_headers(secret, name, PATH, sent, timestamp=int(time.time()))
        t = threading.Thread(
            target=lambda: first.append(dev.http.post(PATH, content=slow_body(), headers=headers))
        )
        t.start()
        try:
            with httpx.Client(base_url=server.url) as probe:
                deadline = time.monotonic() + 20
                while True:  # wait until the first upload is being received
                    second = dev.upload([make_batch(2, series_readings(1))])
                    if second.status_code == 503 or time.monotonic() > deadline:
                        break
                    assert second.status_code == 200
                assert probe.get("/v1/ping").status_code == 200
        finally:
            release.set()
            t.join(30)
        assert second.status_code == 503
        assert second.headers["Retry-After"] == "7" and second.json()["error"] == "overloaded"
        assert first[0].status_code == 200 and first[0].json()["acked"] == [1]
        dev.close()


def test_the_edge_workers_encoding_is_accepted(
    backend: Backend, device: DeviceClient, operator: httpx.Client
) -> None:
    from core._model import Batch as EdgeBatch
    from core._model import SeriesRegistry
    from sync._worker import encode_batch, encode_request

    reg = SeriesRegistry()
    a, b = reg.intern("sensor-a", "temp", {"room": "x"}), reg.intern("sensor-b", "co2")
    batch = EdgeBatch()
    for i in range(50):
        batch.append(1_700_000_000_000 + i, 20.0 + i, a if i % 2 else b, i % 3)
    status = {
        "backlog_batches": 0,
        "backlog_readings": 0,
        "oldest_unsynced_ms": None,
        "dead_letters": 0,
        "link": "wifi",
    }
    body, encoding = encode_request(device.name, [encode_batch(7, batch, reg)], status, "zstd")
    r = device.post_raw(body, encoding=encoding)
    assert r.status_code == 200 and r.json() == {"acked": [7], "duplicates": []}
    rows = operator.get(
        "/v1/readings", params={"device": device.name, "source": "sensor-a", "since": 0}
    ).json()["rows"]
    assert len(rows) == 25 and rows[0]["tags"] == {"room": "x"} and rows[0]["value"] == 21.0


def test_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud import CloudError

    monkeypatch.chdir(tmp_path)
    with open_backend("sqlite:///rel.db"):
        pass
    with open_backend(f"sqlite:///{tmp_path}/abs.db"):  # four slashes: absolute
        pass
    with open_backend(str(tmp_path / "bare.db")):
        pass
    assert {p.name for p in tmp_path.glob("*.db")} == {"rel.db", "abs.db", "bare.db"}
    with pytest.raises(CloudError, match="mysql"):
        open_backend("mysql://x/y")


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
    assert _last_rejection(operator, b)["reason"] == "secret_unreadable"
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
        assert _sql(b, "SELECT version FROM schema_version") == [(3,)]
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
