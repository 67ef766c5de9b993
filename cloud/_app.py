"""The receiver's ASGI app (Starlette): the upload endpoint, the read API, the OpenAPI document.

``create_app(settings)`` returns a Starlette app with the storage backend on
``app.state.backend`` and the settings on ``app.state.settings``.  Pages can be mounted next
to the API with ``create_app(settings, extra_routes=[...])``; the read endpoints call
:func:`require_operator`, which defers to ``app.state.authorize_operator`` (an operator
session of the dashboard, see :mod:`cloud._auth`, or the settings' API bearer token) -- a
device signature never opens them.

Every endpoint's docstring carries its OpenAPI operation (YAML after ``---``); Starlette's
SchemaGenerator assembles them into ``GET /openapi.json``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.schemas import SchemaGenerator

if TYPE_CHECKING:
    from ._dashboard import DashboardSettings

from core._clock import now_ms
from protocol import _signing as signing

from ._backend import Backend, ReadingsQuery, open_backend
from ._errors import MasterKeyError, Rejected, SecretUnreadable, UnknownDevice
from ._openapi import BASE_SCHEMA
from ._secrets import MasterKey, no_master_key
from ._settings import Settings
from ._wire import ENCODINGS, decode_upload, decompress

__all__ = ["api_routes", "create_app", "require_operator"]

log = logging.getLogger("edgepipe.cloud")

Endpoint = Callable[[Request], Awaitable[Response]]


def _error(exc: Rejected) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# -- operator auth --------------------------------------------------------------------------
async def require_operator(request: Request) -> Any:
    """Raise 401 unless the request carries operator credentials; returns the operator
    identity (stored on ``request.state.operator``)."""
    result = request.app.state.authorize_operator(request)
    if inspect.isawaitable(result):
        result = await result
    request.state.operator = result
    return result


def operator_endpoint(func: Endpoint) -> Endpoint:
    @functools.wraps(func)
    async def wrapper(request: Request) -> Response:
        await require_operator(request)
        return await func(request)

    return wrapper


# -- query parameters -------------------------------------------------------------------------
def _int_param(
    request: Request, name: str, default: int | None, lo: int | None = None, hi: int | None = None
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
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


class _Upload:
    """State of one upload request, for the rejection log."""

    __slots__ = ("authenticated", "claimed", "device")

    def __init__(self) -> None:
        self.device: str | None = None  # set once the named device is known to exist
        self.claimed: str | None = None
        self.authenticated = False  # set once its signature verified


async def post_batches(request: Request) -> Response:
    """Upload batches (sync wire protocol v1, signed by the device).
    ---
    summary: Upload batches
    description: >-
      Body is a msgpack map (optionally zstd/gzip compressed) of batches; see
      docs/sync-protocol.md. Idempotent on (device, seq). Every seq in `acked` is durably
      committed, duplicates included.
    operationId: postBatches
    tags: [sync]
    security: [{deviceSignature: []}]
    parameters:
      - {$ref: "#/components/parameters/Device"}
      - {$ref: "#/components/parameters/Timestamp"}
      - {$ref: "#/components/parameters/Nonce"}
      - {$ref: "#/components/parameters/Signature"}
      - {$ref: "#/components/parameters/Link"}
      - name: Content-Encoding
        in: header
        schema: {type: string, enum: [identity, gzip, zstd]}
    requestBody:
      required: true
      content:
        application/vnd.edgepipe.batches+msgpack:
          schema: {type: string, contentMediaType: application/vnd.edgepipe.batches+msgpack}
    responses:
      "200":
        description: Batches stored (or already stored).
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Acks"}
      "400": {$ref: "#/components/responses/Error"}
      "401": {$ref: "#/components/responses/Error"}
      "409":
        description: A batch reuses a stored seq with different content; nothing was stored.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/SequenceConflict"}
      "413": {$ref: "#/components/responses/Error"}
      "415": {$ref: "#/components/responses/Error"}
      "500": {$ref: "#/components/responses/Error"}
      "503": {$ref: "#/components/responses/Overloaded"}
    """
    state = request.app.state
    settings: Settings = state.settings
    if state.inflight >= settings.max_inflight_uploads:
        return _error(
            Rejected(
                503,
                "overloaded",
                "too many uploads in progress; retry later",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        )
    state.inflight += 1
    ctx = _Upload()
    try:
        return await _receive(request, settings, state.backend, ctx)
    except Rejected as exc:
        remote = request.client.host if request.client else None
        detail = exc.detail
        if ctx.device is None and ctx.claimed is not None:
            detail = f"{detail} (claimed device {ctx.claimed[:64]!r})"
        try:
            await run_in_threadpool(
                functools.partial(
                    state.backend.record_rejection,
                    ctx.device,
                    exc.code,
                    detail,
                    remote,
                    now_ms(),
                    authenticated=ctx.authenticated,
                )
            )
        except Exception:  # the refusal itself must still reach the device
            log.exception("could not record a rejection")
        log.info("rejected upload from %s: %s %s", remote, exc.status, exc.code)
        return _error(exc)
    finally:
        state.inflight -= 1


def _header(request: Request, name: str) -> str:
    value = request.headers.get(name)
    if not value:
        raise Rejected(401, "unauthenticated", f"missing header {name}")
    return value


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, "too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _receive(
    request: Request, settings: Settings, backend: Backend, ctx: _Upload
) -> Response:
    # 1. Cheap checks on headers, before reading anything.
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise Rejected(400, "bad_request", "invalid Content-Length")
        if int(length) > settings.max_body_bytes:
            raise Rejected(
                413, "too_large", f"body exceeds the limit of {settings.max_body_bytes} bytes"
            )
    ctype = request.headers.get("content-type", signing.CONTENT_TYPE).split(";")[0].strip()
    if ctype != signing.CONTENT_TYPE:
        raise Rejected(
            415, "unsupported_media_type", f"Content-Type must be {signing.CONTENT_TYPE}"
        )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ENCODINGS:
        raise Rejected(
            415,
            "unsupported_encoding",
            f"Content-Encoding {encoding[:32]!r} is not supported; use one of {', '.join(ENCODINGS)}",
        )
    device = ctx.claimed = _header(request, signing.HEADER_DEVICE)
    ts_raw = _header(request, signing.HEADER_TIMESTAMP)
    nonce = _header(request, signing.HEADER_NONCE)
    signature = _header(request, signing.HEADER_SIGNATURE)
    link = request.headers.get(signing.HEADER_LINK, "unknown").strip().lower()[:32] or "unknown"
    try:
        timestamp = int(ts_raw)
    except ValueError:
        raise Rejected(
            401, "unauthenticated", "X-Edgepipe-Timestamp must be integer seconds"
        ) from None
    if not signing.is_valid_nonce(nonce):
        raise Rejected(401, "unauthenticated", "X-Edgepipe-Nonce must be 32 lowercase hex chars")

    try:
        secret = await run_in_threadpool(backend.get_device_secret, device)
    except (MasterKeyError, SecretUnreadable) as exc:
        # Not the device's fault and not a bad signature: say so, loudly, and keep the
        # device retrying (5xx) until an operator fixes its stored credentials.
        log.error("cannot authenticate device %r: %s", device[:64], exc)
        ctx.device = device
        raise Rejected(
            500,
            "secret_unreadable",
            "the receiver cannot use its stored credentials for this device; see the receiver log",
        ) from None
    if secret is None:
        raise Rejected(401, "unknown_device", "unknown device or bad signature")
    ctx.device = device

    # 2. The body, bounded while streaming; then who sent it.
    body = await _read_body(request, settings.max_body_bytes)
    if not signing.verify(
        secret, request.method, request.url.path, timestamp, nonce, body, signature
    ):
        raise Rejected(401, "bad_signature", "unknown device or bad signature")
    ctx.authenticated = True
    now = now_ms()
    if abs(now // 1000 - timestamp) > settings.max_skew_s:
        raise Rejected(
            401,
            "stale",
            f"timestamp is more than {settings.max_skew_s} s from the receiver's clock",
        )
    if await run_in_threadpool(backend.nonce_seen, device, nonce, now):
        raise Rejected(401, "replay", "this nonce was already used")

    # 3. Decode (CPU-bound: off the event loop), then store in one transaction.
    def decode() -> Any:
        data = decompress(body, encoding, settings.max_decompressed_bytes)
        return decode_upload(data, device)

    upload = await run_in_threadpool(decode)
    # A nonce must be remembered until its timestamp can no longer pass the skew check.
    expires = (max(timestamp * 1000, now) + 2 * settings.max_skew_s * 1000) + 1000
    try:
        result = await run_in_threadpool(
            backend.ingest,
            upload,
            link=link,
            nbytes=len(body),
            nonce=nonce,
            nonce_expires=expires,
            now=now,
        )
    except UnknownDevice:  # removed while we were decoding
        raise Rejected(401, "unknown_device", "unknown device or bad signature") from None
    return JSONResponse({"acked": result.acked, "duplicates": result.duplicates})


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
        raise Rejected(404, "not_found", f"no device named {name[:64]!r}")
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
    try:
        metrics = await run_in_threadpool(_backend(request).device_metrics, name)
    except UnknownDevice:
        raise Rejected(404, "not_found", f"no device named {name[:64]!r}") from None
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
      - {name: since, in: query, description: "ms since epoch, inclusive (default until - 24 h)", schema: {type: integer}}
      - {name: until, in: query, description: "ms since epoch, exclusive (default now)", schema: {type: integer}}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 10000, default: 1000}}
      - {name: step, in: query, description: bucket width in ms (forces downsampling), schema: {type: integer, minimum: 1}}
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
        since=_int_param(request, "since", None),
        until=_int_param(request, "until", None),
        limit=_int_param(request, "limit", 1000, 1, 10_000) or 1000,
        step=_int_param(request, "step", None, 1, None),
    )
    if q.since is not None and q.until is not None and q.since >= q.until:
        raise Rejected(400, "bad_query", "since must be before until")
    try:
        result = await run_in_threadpool(_backend(request).readings, q)
    except UnknownDevice:
        raise Rejected(404, "not_found", f"no device named {device[:64]!r}") from None
    return JSONResponse(result)


def _log_params(request: Request) -> tuple[str | None, int, int | None]:
    return (
        request.query_params.get("device") or None,
        _int_param(request, "limit", 100, 1, 1000) or 100,
        _int_param(request, "before", None),
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
      - {name: before, in: query, description: only entries with a smaller id (paging), schema: {type: integer}}
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
      - {name: before, in: query, description: only entries received before this time (ms), schema: {type: integer}}
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


def api_routes() -> list[BaseRoute]:
    return [
        Route("/v1/ping", ping, methods=["GET"]),
        Route("/v1/batches", post_batches, methods=["POST"]),
        Route("/v1/devices", list_devices, methods=["GET"]),
        Route("/v1/devices/{name}", get_device, methods=["GET"]),
        Route("/v1/devices/{name}/metrics", device_metrics, methods=["GET"]),
        Route("/v1/readings", readings, methods=["GET"]),
        Route("/v1/rejections", rejections, methods=["GET"]),
        Route("/v1/dead-letters", dead_letters, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]


async def _rejected(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Rejected)
    return _error(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": code, "detail": str(exc.detail)},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal", "detail": "internal server error"}, status_code=500)


def create_app(
    settings: Settings | None = None,
    *,
    backend: Backend | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    dashboard: DashboardSettings | None = None,
) -> Starlette:
    """The receiver app.  Without ``backend`` one is opened from ``settings.db`` with the
    master key from ``settings`` at startup (none configured: :class:`MasterKeyError`) and
    closed at shutdown; a given backend is left open (the caller owns it)."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owned = app.state.backend is None
        if owned:
            master_key = MasterKey.from_settings(settings)
            if master_key is None:
                raise no_master_key()
            app.state.backend = await run_in_threadpool(
                functools.partial(open_backend, settings.db, master_key=master_key)
            )
        try:
            yield
        finally:
            if owned:
                app.state.backend.close()
                app.state.backend = None

    from ._dashboard import dashboard_routes, install

    app = Starlette(
        routes=[*api_routes(), *dashboard_routes(), *extra_routes],
        lifespan=lifespan,
        exception_handlers={
            Rejected: _rejected,
            HTTPException: _http_error,
            Exception: _internal,
        },
    )
    app.state.settings = settings
    app.state.backend = backend
    app.state.inflight = 0
    token = settings.api_token.get_secret_value() if settings.api_token else None
    install(app, dashboard, token)  # operator sessions (or the API token) for the read API
    return app
