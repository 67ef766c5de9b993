"""The receiver's contract, run against both backends (real SQLite file, real PostgreSQL)
through a real uvicorn server and real HTTP: uploads, idempotency and ordering, every
refusal (right status, nothing stored, logged where the protocol says), overload, the edge
worker's own encoding.  Fixtures in conftest.py; the read API is in test_cloud_read_api.py,
the backend without HTTP in test_cloud_backend.py, device secrets at rest in
test_cloud_master_key.py."""

from __future__ import annotations

import concurrent.futures
import gzip
import time
from collections.abc import Iterator

import httpx
import msgpack
import pytest
import zstandard

from cloud import Backend, Settings, create_app
from protocol import _signing
from tests.helpers.cloud_client import (
    MAX_BODY,
    PATH,
    TOKEN,
    DeviceClient,
    LiveServer,
    encode,
    last_rejection,
    make_batch,
    new_device,
    series_readings,
)


def _stored(backend: Backend, device: DeviceClient) -> int:
    return backend.count_readings(device.name)


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
    assert last_rejection(operator, device.name)["reason"] == "sequence_conflict"
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
    rej = last_rejection(operator)
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
    assert last_rejection(operator, device.name)["reason"] == "replay"


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


def test_device_labels_are_bounded_and_listed(backend: Backend) -> None:
    from cloud._rollout_store import BadLabel

    name, _ = new_device(backend)
    assert backend.set_labels(name, {"site": "north", "ring": "beta"}) == {
        "ring": "beta",
        "site": "north",
    }
    assert backend.set_labels(name, {"ring": "ga"}, ["site"]) == {"ring": "ga"}
    assert backend.device_labels()[name] == {"ring": "ga"}
    assert name in backend.devices_labelled("ring", "ga")
    for bad in ({"": "x"}, {"k": ""}, {"k": "a b"}, {"k" * 64: "v"}, {"k": "<script>"}):
        with pytest.raises(BadLabel):
            backend.set_labels(name, bad)
    with pytest.raises(BadLabel, match="at most 32"):
        backend.set_labels(name, {f"k{i}": "v" for i in range(40)})
    assert backend.device_labels()[name] == {"ring": "ga"}  # nothing of it was written
    assert backend.remove_device(name)
    assert name not in backend.device_labels()
