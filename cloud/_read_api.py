"""The read API (``/v1/devices``, ``/v1/readings``, the logs) for operators, the
reachability probe and the OpenAPI document.

The read endpoints need operator credentials (:func:`cloud._auth.operator_endpoint`) -- a
device signature never opens them.  Every endpoint's docstring carries its OpenAPI
operation (YAML after ``---``); Starlette's SchemaGenerator assembles them into
``GET /openapi.json``.  Domain errors of the backend (an unknown device: 404) are answered
by the app's exception handlers (:mod:`cloud._http_errors`).
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.schemas import SchemaGenerator

from ._auth import operator_endpoint
from ._backend import Backend, ReadingsQuery
from ._errors import Rejected, UnknownDevice
from ._openapi import BASE_SCHEMA
from ._queries import MAX_TS_MS

__all__ = [
    "dead_letters",
    "device_metrics",
    "get_device",
    "list_devices",
    "openapi",
    "ping",
    "readings",
    "rejections",
]


# -- query parameters -------------------------------------------------------------------------
def _int_param(
    request: Request, name: str, default: int | None, lo: int | None = None, hi: int | None = None
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if len(raw) > 24:
        raise Rejected(400, "bad_query", f"{name} must be an integer between {lo} and {hi}")
    try:
        value = int(raw)
    except ValueError:
        raise Rejected(400, "bad_query", f"{name} must be an integer") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise Rejected(400, "bad_query", f"{name} must be between {lo} and {hi}")
    return value


def _backend(request: Request) -> Backend:
    return request.app.state.backend


# -- endpoints ------------------------------------------------------------------------------
async def ping(request: Request) -> Response:
    """Reachability probe (no authentication).
    ---
    summary: Reachability probe
    operationId: ping
    tags: [sync]
    responses:
      "200":
        description: The receiver is up.
        content:
          application/json:
            schema: {type: object, properties: {ok: {const: true}}, required: [ok]}
    """
    return JSONResponse({"ok": True})


@operator_endpoint
async def list_devices(request: Request) -> Response:
    """List devices with their sync status.
    ---
    summary: List devices with sync status
    operationId: listDevices
    tags: [read]
    security: [{operatorBearer: []}]
    responses:
      "200":
        description: Every registered device.
        content:
          application/json:
            schema:
              type: object
              properties:
                devices: {type: array, items: {$ref: "#/components/schemas/Device"}}
              required: [devices]
      "401": {$ref: "#/components/responses/Error"}
    """
    return JSONResponse({"devices": await run_in_threadpool(_backend(request).list_devices)})


@operator_endpoint
async def get_device(request: Request) -> Response:
    """One device's sync status.
    ---
    summary: One device's sync status
    operationId: getDevice
    tags: [read]
    security: [{operatorBearer: []}]
    parameters:
      - {$ref: "#/components/parameters/Name"}
    responses:
      "200":
        description: The device.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Device"}
      "401": {$ref: "#/components/responses/Error"}
      "404": {$ref: "#/components/responses/Error"}
    """
    name = request.path_params["name"]
    device = await run_in_threadpool(_backend(request).get_device, name)
    if device is None:
        raise UnknownDevice(name)
    return JSONResponse(device)


@operator_endpoint
async def device_metrics(request: Request) -> Response:
    """The series a device has uploaded.
    ---
    summary: Series (source, metric, tags) of one device
    operationId: deviceMetrics
    tags: [read]
    security: [{operatorBearer: []}]
    parameters:
      - {$ref: "#/components/parameters/Name"}
    responses:
      "200":
        description: One entry per series.
        content:
          application/json:
            schema:
              type: object
              properties:
                device: {type: string}
                metrics: {type: array, items: {$ref: "#/components/schemas/Metric"}}
              required: [device, metrics]
      "401": {$ref: "#/components/responses/Error"}
      "404": {$ref: "#/components/responses/Error"}
    """
    name = request.path_params["name"]
    metrics = await run_in_threadpool(_backend(request).device_metrics, name)
    return JSONResponse({"device": name, "metrics": metrics})


@operator_endpoint
async def readings(request: Request) -> Response:
    """Readings of one device, raw or downsampled.
    ---
    summary: Readings of one device, raw or downsampled
    description: >-
      Returns at most `limit` rows. Without `step`, raw readings are returned when they fit,
      otherwise the range is split into buckets so that every series fits in `limit` rows, and
      each bucket carries avg/min/max/count computed by the database. `truncated` says that
      rows were left off.
    operationId: readings
    tags: [read]
    security: [{operatorBearer: []}]
    parameters:
      - {name: device, in: query, required: true, schema: {type: string}}
      - {name: metric, in: query, schema: {type: string}}
      - {name: source, in: query, description: the reading's own device field, schema: {type: string}}
      - {name: since, in: query, description: "ms since epoch, inclusive (default until - 24 h)", schema: {type: integer, minimum: 0, maximum: 4102444800000}}
      - {name: until, in: query, description: "ms since epoch, exclusive (default now)", schema: {type: integer, minimum: 1, maximum: 4102444800000}}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 10000, default: 1000}}
      - {name: step, in: query, description: bucket width in ms (forces downsampling), schema: {type: integer, minimum: 1, maximum: 4102444800000}}
    responses:
      "200":
        description: Rows, oldest first.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Readings"}
      "400": {$ref: "#/components/responses/Error"}
      "401": {$ref: "#/components/responses/Error"}
      "404": {$ref: "#/components/responses/Error"}
    """
    p = request.query_params
    device = p.get("device")
    if not device:
        raise Rejected(400, "bad_query", "device is required")
    q = ReadingsQuery(
        device=device,
        metric=p.get("metric") or None,
        source=p.get("source") or None,
        since=_int_param(request, "since", None, 0, MAX_TS_MS),
        until=_int_param(request, "until", None, 1, MAX_TS_MS),
        limit=_int_param(request, "limit", 1000, 1, 10_000) or 1000,
        step=_int_param(request, "step", None, 1, MAX_TS_MS),
    )
    if q.since is not None and q.until is not None and q.since >= q.until:
        raise Rejected(400, "bad_query", "since must be before until")
    result = await run_in_threadpool(_backend(request).readings, q)
    return JSONResponse(result)


def _log_params(request: Request) -> tuple[str | None, int, int | None]:
    return (
        request.query_params.get("device") or None,
        _int_param(request, "limit", 100, 1, 1000) or 100,
        _int_param(request, "before", None, 0, 2**62),
    )


@operator_endpoint
async def rejections(request: Request) -> Response:
    """The rejection log, newest first.
    ---
    summary: Rejected uploads, newest first
    operationId: rejections
    tags: [read]
    security: [{operatorBearer: []}]
    parameters:
      - {$ref: "#/components/parameters/DeviceFilter"}
      - {$ref: "#/components/parameters/LogLimit"}
      - {name: before, in: query, description: only entries with a smaller id (paging), schema: {type: integer, minimum: 0, maximum: 4611686018427387904}}
    responses:
      "200":
        description: Log entries.
        content:
          application/json:
            schema:
              type: object
              properties:
                rejections: {type: array, items: {$ref: "#/components/schemas/Rejection"}}
              required: [rejections]
      "400": {$ref: "#/components/responses/Error"}
      "401": {$ref: "#/components/responses/Error"}
    """
    device, limit, before = _log_params(request)
    rows = await run_in_threadpool(_backend(request).rejections, device, limit, before)
    return JSONResponse({"rejections": rows})


@operator_endpoint
async def dead_letters(request: Request) -> Response:
    """Dead-letter metadata reported by devices, newest first.
    ---
    summary: Dead-letter metadata reported by devices, newest first
    operationId: deadLetters
    tags: [read]
    security: [{operatorBearer: []}]
    parameters:
      - {$ref: "#/components/parameters/DeviceFilter"}
      - {$ref: "#/components/parameters/LogLimit"}
      - {name: before, in: query, description: only entries received before this time (ms), schema: {type: integer, minimum: 0, maximum: 4611686018427387904}}
    responses:
      "200":
        description: Dead letters (metadata only).
        content:
          application/json:
            schema:
              type: object
              properties:
                dead_letters: {type: array, items: {$ref: "#/components/schemas/DeadLetter"}}
              required: [dead_letters]
      "400": {$ref: "#/components/responses/Error"}
      "401": {$ref: "#/components/responses/Error"}
    """
    device, limit, before = _log_params(request)
    rows = await run_in_threadpool(_backend(request).dead_letters, device, limit, before)
    return JSONResponse({"dead_letters": rows})


_schemas = SchemaGenerator(BASE_SCHEMA)


async def openapi(request: Request) -> Response:
    """This document.
    ---
    summary: The OpenAPI 3.1 document of this API
    operationId: openapi
    tags: [meta]
    responses:
      "200":
        description: OpenAPI 3.1 document.
        content:
          application/json:
            schema: {type: object}
    """
    return JSONResponse(_schemas.get_schema(request.app.routes))
