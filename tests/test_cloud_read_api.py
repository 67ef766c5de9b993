"""The receiver's read API (operator credentials, errors, bounded and exact downsampling,
rejection log paging) and its answers against the OpenAPI document, on both backends
through a real uvicorn server (fixtures in conftest.py)."""

from __future__ import annotations

import time

import httpx

from cloud import Backend
from protocol import _signing
from tests.helpers.cloud_client import TOKEN, DeviceClient, LiveServer, make_batch, series_readings


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
