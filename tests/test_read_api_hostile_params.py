"""Hostile query parameters on every operator route, against a real receiver (uvicorn on
loopback) over each backend (SQLite file, PostgreSQL schema): each is refused with a clear
400, never an internal error."""

from __future__ import annotations

import time

import httpx
import pytest

from protocol import _signing

#: Every operator GET route that takes a device name or free text, with its other
#: required parameters.
TEXT_ROUTES = [
    ("/v1/logs", {}, "device"),
    ("/v1/logs", {}, "q"),
    ("/v1/devices/gw/logs", {}, "q"),
    ("/v1/alerts", {}, "device"),
    ("/v1/rejections", {}, "device"),
    ("/v1/dead-letters", {}, "device"),
    ("/v1/readings", {}, "device"),
    ("/v1/readings", {"device": "gw"}, "metric"),
    ("/ui/api/fleet", {}, "device"),
    ("/ui/api/health", {}, "device"),
    ("/ui/api/logs", {}, "device"),
    ("/ui/api/metrics", {}, "device"),
    ("/ui/api/series", {"metric": "m"}, "device"),
]


@pytest.mark.parametrize(("path", "base", "key"), TEXT_ROUTES)
def test_a_nul_in_a_query_parameter_is_a_400(
    operator: httpx.Client, path: str, base: dict[str, str], key: str
) -> None:
    # PostgreSQL refuses text with NUL: it was a 500 (and a traceback) on every route
    r = operator.get(path, params={**base, key: "gw\x00; DROP TABLE devices"})
    assert r.status_code == 400, (path, key, r.text)
    assert r.json()["error"] == "bad_request" and "NUL" in r.json()["detail"]


@pytest.mark.parametrize(
    "path", ["/v1/devices/gw%00x", "/v1/devices/gw%00x/logs", "/v1/devices/gw%00x/health"]
)
def test_a_nul_in_the_path_is_a_400(operator: httpx.Client, path: str) -> None:
    r = operator.get(path)
    assert r.status_code == 400, (path, r.text)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/logs", {"before": "\u00b2.1.1"}),  # "²".isdigit(), but int("²") fails: was 500
        ("/v1/logs", {"before": "\u0661.1.1"}),  # Arabic-Indic digit: no cursor ever says it
        ("/v1/devices/gw/logs", {"before": "1.\u00b3.1"}),
        ("/v1/alerts", {"limit": "\u00b2"}),  # was 500
        ("/v1/alerts", {"limit": "\u0661"}),
    ],
)
def test_digits_that_are_not_ascii_are_a_400(
    operator: httpx.Client, path: str, params: dict[str, str]
) -> None:
    r = operator.get(path, params=params)
    assert r.status_code == 400, (path, params, r.text)


def test_every_read_route_needs_an_operator(server, device) -> None:
    """Anonymous, a wrong token, and a device's own signed headers: 401 on every GET route
    of the read API and the dashboard's JSON (new routes included as they are added)."""
    from cloud._app import api_routes
    from cloud._dashboard import dashboard_routes

    open_routes = {"/v1/ping", "/openapi.json"}
    device_routes = {"/v1/modules/{sha256}"}
    paths = [
        r.path.replace("{name}", device.name)
        for r in [*api_routes(), *dashboard_routes()]
        if getattr(r, "methods", None) and "GET" in r.methods
        and r.path.startswith(("/v1/", "/ui/api/")) and r.path not in open_routes
    ]  # fmt: skip
    assert "/v1/logs" in paths and "/ui/api/health" in paths and "/v1/alerts" in paths
    for path in paths:
        # the device's own valid signature, for this very request
        signed = _signing.signed_headers_v2(
            device.secret, device.name, path, b"", timestamp=int(time.time()), method="GET"
        )
        # a device route (modules of its desired bundle) takes the device's signature instead
        tries = ({}, {"Authorization": "Bearer not-the-token"})
        for headers in tries if path in device_routes else (*tries, signed):
            r = httpx.get(server.url + path, params={"device": device.name}, headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code)


def test_log_search_ignores_case_beyond_ascii_on_both_backends(operator, device) -> None:
    # SQLite's lower() folds ASCII only: "échec" did not find "ÉCHEC" there (PostgreSQL did)
    from tests.helpers.cloud_client import log_record

    now = int(time.time() * 1000)
    msgs = ["ÉCHEC du capteur", "Über-Temperatur: 91 °C", "ΣΦΑΛΜΑ αισθητήρα"]
    logs = [log_record(i + 1, now - 1000 + i, "ERROR", m) for i, m in enumerate(msgs)]
    assert device.upload([], logs=logs).status_code == 200
    for q, want in (("échec", msgs[0]), ("ÜBER", msgs[1]), ("σφαλμα", msgs[2]), ("°c", msgs[1])):
        r = operator.get("/v1/logs", params={"device": device.name, "q": q})
        assert r.status_code == 200, r.text
        assert [x["msg"] for x in r.json()["logs"]] == [want], (q, r.json())
