"""The OpenAPI 3.1 document served at /openapi.json is valid and describes every route."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from cloud import Settings, api_routes, create_app, open_backend
from tests.helpers.cloud_client import LiveServer


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    path: Path = tmp_path_factory.mktemp("openapi") / "c.db"
    with (
        open_backend(f"sqlite:///{path}") as backend,
        LiveServer(create_app(Settings(api_token="t"), backend=backend)) as server,
    ):
        r = httpx.get(server.url + "/openapi.json")  # public, like /v1/ping
        assert r.status_code == 200
        yield r.json()


def test_document_is_valid_openapi_31(doc: dict) -> None:
    from openapi_spec_validator import validate

    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_every_route_is_described(doc: dict) -> None:
    routes = [r for r in api_routes() if isinstance(r, Route)]
    assert len(routes) >= 9
    for route in routes:
        ops = doc["paths"][route.path]
        methods = {m.lower() for m in route.methods or ()} - {"head"}
        assert set(ops) == methods, route.path
        for op in ops.values():
            assert op["responses"] and op["operationId"] and op["summary"]
            declared = {p["name"] for p in op.get("parameters", []) if "name" in p} | {
                doc["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]["name"]
                for p in op.get("parameters", [])
                if "$ref" in p
            }
            for name in re.findall(r"{(\w+)}", route.path):
                assert name in declared, (route.path, name)
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_security_is_declared(doc: dict) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert schemes["operatorBearer"] == {"type": "http", "scheme": "bearer"}
    assert doc["paths"]["/v1/batches"]["post"]["security"] == [{"deviceSignature": []}]
    for path in (
        "/v1/devices",
        "/v1/devices/{name}",
        "/v1/readings",
        "/v1/rejections",
        "/v1/dead-letters",
        "/v1/devices/{name}/metrics",
    ):
        assert doc["paths"][path]["get"]["security"] == [{"operatorBearer": []}], path
    assert "security" not in doc["paths"]["/v1/ping"]["get"]
