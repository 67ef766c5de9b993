"""The device side of bundles: ``POST /v1/bundle`` (check in: report the bundle state, get
the desired bundle) and ``GET /v1/modules/{sha256}`` (a module of that bundle); for
operators, ``GET /v1/bundles`` (bundles and the fleet's bundle state) and
``GET /v1/devices/{name}/bundle`` (one device's state and events).

Both are authenticated exactly like an upload with a version 2 signature
(:mod:`protocol._signing`): the headers and the body's digest are signed, the timestamp
must be within ``max_skew_s``, every nonce is single-use (the nonces table uploads use), and
an unknown device gets the same answer as a bad signature.  Version 1 signatures are not
accepted here (no device that predates them knows these endpoints).  Each device has its own
token bucket per endpoint, so a device in a loop cannot keep the receiver busy.

A check-in body is JSON (:func:`parse_report`, bounded: 64 KiB, at most 64 stages of health,
32 reasons each); the answer carries the desired bundle's version, priority and size and,
unless the device reports that version as active or as refused already, the envelope
(manifest and signature, :func:`protocol._bundle.envelope`).  A module is served only if the
bundle desired for the requesting device names it (404 otherwise: nobody lists the store).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
from collections import Counter
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core._clock import now_ms
from protocol import _signing as signing
from protocol._bundle import DEVICE_REASONS, envelope

from ._admission import DeviceRate
from ._auth import operator_endpoint
from ._backend import Backend
from ._errors import CloudError, MasterKeyError, Rejected, SecretUnreadable, UnknownDevice
from ._http_errors import UNKNOWN_DEVICE_OR_BAD_SIGNATURE, error_response, rejection_for
from ._settings import Settings

__all__ = [
    "MAX_REPORT_BYTES",
    "BundleGate",
    "check_in",
    "device_bundle",
    "get_module",
    "list_bundles",
    "parse_report",
]

log = logging.getLogger("edgepipe.cloud")

REPORT_TYPE = "application/json"
MAX_REPORT_BYTES = 64 * 1024
MAX_STAGES = 64
MAX_REASONS = 32
_STAGE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_STATUSES = ("applied", "failed", "downloading", "waiting")
_INT_MAX = 2**63 - 1


class BundleGate:
    """Per-device token buckets of check-ins and module downloads, and the refusals of
    requests that did not prove their origin (counted, never written per request)."""

    def __init__(self) -> None:
        self.check_ins = DeviceRate(1.0, 10)
        self.modules = DeviceRate(4.0, 64)
        self.refused: Counter[str] = Counter()


def _gate(request: Request) -> BundleGate:
    gate = getattr(request.app.state, "bundle_gate", None)
    if gate is None:
        gate = request.app.state.bundle_gate = BundleGate()
    return gate


# -- the report -----------------------------------------------------------------------------
def _opt_int(obj: dict[str, Any], key: str) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _INT_MAX:
        raise ValueError(f"{key} must be a non-negative integer or null")
    return v


def _opt_text(obj: dict[str, Any], key: str, n: int) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"{key} must be a string or null")
    return v[:n]


def _counts(v: Any, where: str) -> dict[str, int]:
    if not isinstance(v, dict) or len(v) > MAX_REASONS:
        raise ValueError(f"{where} must be a map of at most {MAX_REASONS} counts")
    out = {}
    for k, n in v.items():
        if not isinstance(k, str) or not _LABEL.fullmatch(k):
            raise ValueError(f"{where}: bad key")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= _INT_MAX:
            raise ValueError(f"{where}.{k} must be a non-negative integer")
        out[k] = n
    return out


def parse_report(data: bytes) -> dict[str, Any]:
    """A check-in body -> the validated report; ``ValueError`` saying what is wrong."""
    try:
        obj = json.loads(data or b"{}")
    except ValueError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("the body must be a JSON object")
    known = {"active_version", "previous_version", "applied_ms", "status", "version"}
    known |= {"reason", "detail", "health", "chain"}
    if set(obj) - known:
        raise ValueError(f"unknown fields: {sorted(set(obj) - known)[:5]}")
    out: dict[str, Any] = {k: _opt_int(obj, k) for k in ("active_version", "previous_version")}
    out["applied_ms"] = _opt_int(obj, "applied_ms")
    if obj.get("chain") not in (None, "bundle", "local"):
        raise ValueError("chain must be 'bundle', 'local' or null")
    out["version"] = _opt_int(obj, "version")
    status = obj.get("status")
    if status is not None and status not in _STATUSES:
        raise ValueError(f"status must be one of {', '.join(_STATUSES)} or null")
    out["status"] = status
    reason = _opt_text(obj, "reason", 64)
    if reason is not None and reason not in DEVICE_REASONS:
        raise ValueError(f"reason {reason!r} is not a known refusal reason")
    out["reason"] = reason
    out["detail"] = _opt_text(obj, "detail", 500)
    health = obj.get("health")
    if health is not None:
        if not isinstance(health, dict) or len(health) > MAX_STAGES:
            raise ValueError(f"health must be a map of at most {MAX_STAGES} stages")
        checked: dict[str, Any] = {}
        for stage, h in health.items():
            if not isinstance(stage, str) or not _STAGE.fullmatch(stage) or not isinstance(h, dict):
                raise ValueError("health: each stage name maps to an object")
            row: dict[str, Any] = {}
            for k, v in h.items():
                if k in ("drops", "traps"):
                    row[k] = _counts(v, f"health.{stage}.{k}")
                elif k in ("in", "out", "dead_letters", "breaker_open", "since_ms"):
                    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _INT_MAX:
                        raise ValueError(f"health.{stage}.{k} must be a non-negative integer")
                    row[k] = v
                else:
                    raise ValueError(f"health.{stage}: unknown field {str(k)[:32]!r}")
            checked[stage] = row
        out["health"] = checked
    else:
        out["health"] = None
    return out


# -- authentication -------------------------------------------------------------------------
async def _authenticated(
    request: Request, backend: Backend, settings: Settings, bucket: DeviceRate
) -> tuple[str, bytes]:
    """(device, body) of a v2-signed request, or :class:`Rejected`."""
    h = request.headers

    def need(name: str) -> str:
        v = h.get(name)
        if not v:
            raise Rejected(401, "unauthenticated", f"missing header {name}")
        return v

    device = need(signing.HEADER_DEVICE)
    if len(device) > 128:
        raise Rejected(401, "unauthenticated", "X-Edgepipe-Device is longer than 128 characters")
    ts_raw, nonce = need(signing.HEADER_TIMESTAMP), need(signing.HEADER_NONCE)
    signature, digest = need(signing.HEADER_SIGNATURE), need(signing.HEADER_DIGEST)
    if not (ts_raw.lstrip("-").isdigit() and len(ts_raw) <= 20):
        raise Rejected(401, "unauthenticated", "X-Edgepipe-Timestamp must be integer seconds")
    if not signing.is_valid_nonce(nonce) or not signing.is_valid_digest(digest):
        raise Rejected(401, "unauthenticated", "malformed X-Edgepipe-Nonce or -Content-SHA256")
    if not signature.startswith(signing.SIGNATURE_PREFIX_V2):
        raise Rejected(401, "unauthenticated", "X-Edgepipe-Signature must be v2=")
    length = h.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_REPORT_BYTES):
        raise Rejected(413, "too_large", f"body exceeds the limit of {MAX_REPORT_BYTES} bytes")
    try:
        secret = await run_in_threadpool(backend.get_device_secret, device)
    except (MasterKeyError, SecretUnreadable) as exc:
        log.error("cannot authenticate device %r: %s", device[:64], exc)
        raise
    if secret is None:
        raise Rejected(401, "bad_signature", UNKNOWN_DEVICE_OR_BAD_SIGNATURE)
    ctype = h.get("content-type", "application/json")
    encoding = h.get("content-encoding", "identity")
    link = h.get(signing.HEADER_LINK, "unknown")
    timestamp = int(ts_raw)
    if not signing.verify_v2(
        secret,
        request.method,
        request.url.path,
        timestamp,
        nonce,
        ctype,
        encoding,
        link,
        digest,
        signature,
    ):
        raise Rejected(401, "bad_signature", UNKNOWN_DEVICE_OR_BAD_SIGNATURE)
    now = now_ms()
    if abs(now // 1000 - timestamp) > settings.max_skew_s:
        raise Rejected(
            401,
            "stale",
            f"timestamp is more than {settings.max_skew_s} s from the receiver's clock",
        )
    wait = bucket.take(device)
    if wait is not None:
        raise Rejected(
            429,
            "rate_limited",
            "too many requests from this device; retry later",
            headers={"Retry-After": str(max(1, int(wait + 0.999)))},
        )
    expires = max(timestamp * 1000, now) + 2 * settings.max_skew_s * 1000 + 1000
    if not await run_in_threadpool(backend.consume_nonce, device, nonce, expires, now):
        raise Rejected(401, "replay", f"device {device!r}: nonce was already used")
    if encoding.strip().lower() != "identity":
        raise Rejected(415, "unsupported_encoding", "these requests are not compressed")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_REPORT_BYTES:
                    raise Rejected(413, "too_large", f"body exceeds {MAX_REPORT_BYTES} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise Rejected(408, "timeout", "the body did not arrive in time") from None
    body = b"".join(chunks)
    if hashlib.sha256(body).hexdigest() != digest:
        raise Rejected(401, "bad_signature", UNKNOWN_DEVICE_OR_BAD_SIGNATURE)
    return device, body


async def _answer(request: Request, bucket_of: str, handle: Any) -> Response:
    state = request.app.state
    gate = _gate(request)
    try:
        device, body = await _authenticated(
            request, state.backend, state.settings, getattr(gate, bucket_of)
        )
        return await handle(state.backend, device, body)
    except CloudError as err:
        exc = rejection_for(err)
        if exc is None:
            raise
        if isinstance(err, UnknownDevice):  # removed between its check and now
            exc = Rejected(401, "bad_signature", UNKNOWN_DEVICE_OR_BAD_SIGNATURE)
        if exc.status == 401 or exc.status == 429:
            if len(gate.refused) < 64 or exc.code in gate.refused:
                gate.refused[exc.code] += 1
        return error_response(exc)


# -- endpoints ------------------------------------------------------------------------------
async def check_in(request: Request) -> Response:
    """Report the device's bundle state; get its desired bundle (signed by the device).
    ---
    summary: Bundle check-in
    description: >-
      The body is the device's bundle state (JSON, at most 64 KiB; docs/sync-protocol.md).
      The answer names the desired bundle and, unless the device already runs it or
      reported refusing it or working on it, carries its signed manifest (docs/rollout.md).
    operationId: bundleCheckIn
    tags: [sync]
    security: [{deviceSignature: []}]
    parameters:
      - {$ref: "#/components/parameters/Device"}
      - {$ref: "#/components/parameters/Timestamp"}
      - {$ref: "#/components/parameters/Nonce"}
      - {$ref: "#/components/parameters/Signature"}
      - {$ref: "#/components/parameters/Link"}
    requestBody:
      required: true
      content:
        application/json:
          schema: {type: object}
    responses:
      "200":
        description: The desired bundle (or none).
        content:
          application/json:
            schema:
              type: object
              properties:
                desired:
                  type: [object, "null"]
                  properties:
                    version: {type: integer}
                    priority: {type: string, enum: [normal, urgent]}
                    total_bytes: {type: integer}
                    envelope:
                      type: [object, "null"]
                      properties:
                        manifest: {type: string}
                        signature: {type: string}
                        key_id: {type: string}
              required: [desired]
      "400": {$ref: "#/components/responses/Error"}
      "401": {$ref: "#/components/responses/Error"}
      "413": {$ref: "#/components/responses/Error"}
      "415": {$ref: "#/components/responses/Error"}
      "429": {$ref: "#/components/responses/Error"}
    """

    async def handle(backend: Backend, device: str, body: bytes) -> Response:
        try:
            report = parse_report(body)
        except ValueError as e:
            raise Rejected(400, "bad_request", str(e)[:300]) from None
        now = now_ms()
        await run_in_threadpool(
            functools.partial(backend.report_bundle_state, device, report, now=now)
        )
        rollouts = getattr(request.app.state, "rollouts", None)
        if rollouts is not None:
            rollouts.device_reported(device)
        bundle = await run_in_threadpool(backend.desired_bundle, device)
        desired = None
        if bundle is not None:
            v = bundle["version"]
            # a version the device runs, refused, or is waiting on (it keeps the manifest)
            known = v == report["active_version"] or (
                report["version"] == v and report["status"] in ("failed", "waiting", "downloading")
            )
            desired = {
                "version": v,
                "priority": bundle["priority"],
                "total_bytes": bundle["total_bytes"],
                "envelope": None
                if known
                else envelope(bundle["manifest"], bundle["signature"], bundle["key_id"]),
            }
        return JSONResponse({"desired": desired}, headers={"X-Edgepipe-Time": str(now_ms())})

    return await _answer(request, "check_ins", handle)


async def get_module(request: Request) -> Response:
    """A module of the bundle desired for this device, by sha256 (signed by the device).
    ---
    summary: Download a bundle module
    operationId: getBundleModule
    tags: [sync]
    security: [{deviceSignature: []}]
    parameters:
      - name: sha256
        in: path
        required: true
        schema: {type: string, pattern: "^[0-9a-f]{64}$"}
      - {$ref: "#/components/parameters/Device"}
      - {$ref: "#/components/parameters/Timestamp"}
      - {$ref: "#/components/parameters/Nonce"}
      - {$ref: "#/components/parameters/Signature"}
    responses:
      "200":
        description: The module's bytes.
        content:
          application/wasm:
            schema: {type: string, contentMediaType: application/wasm}
      "401": {$ref: "#/components/responses/Error"}
      "404": {$ref: "#/components/responses/Error"}
      "429": {$ref: "#/components/responses/Error"}
    """
    sha = request.path_params["sha256"]

    async def handle(backend: Backend, device: str, body: bytes) -> Response:
        if not _HEX64.fullmatch(sha):
            raise Rejected(404, "not_found", "no such module")
        data = await run_in_threadpool(backend.module_for_device, device, sha)
        if data is None:
            raise Rejected(404, "not_found", "no module of that sha256 in this device's bundle")
        return Response(data, media_type="application/wasm")

    return await _answer(request, "modules", handle)


# -- operators ------------------------------------------------------------------------------
@operator_endpoint
async def list_bundles(request: Request) -> Response:
    """Every bundle (newest first) and every device's desired and reported bundle.
    ---
    summary: Bundles and the fleet's bundle state
    operationId: listBundles
    tags: [read]
    security: [{operatorBearer: []}]
    responses:
      "200":
        description: Bundles (without their manifests) and one state per device.
        content:
          application/json:
            schema:
              type: object
              properties:
                bundles: {type: array, items: {type: object}}
                devices: {type: array, items: {type: object}}
              required: [bundles, devices]
      "401": {$ref: "#/components/responses/Error"}
    """
    backend: Backend = request.app.state.backend
    bundles = await run_in_threadpool(backend.list_bundles)
    states = await run_in_threadpool(backend.bundle_states)
    return JSONResponse({"bundles": bundles, "devices": states})


@operator_endpoint
async def device_bundle(request: Request) -> Response:
    """One device's desired and reported bundle, and its bundle events (oldest first).
    ---
    summary: Bundle state and timeline of one device
    operationId: deviceBundle
    tags: [read]
    security: [{operatorBearer: []}]
    parameters:
      - {$ref: "#/components/parameters/Name"}
      - name: since
        in: query
        schema: {type: integer, minimum: 0}
    responses:
      "200":
        description: The state and the events.
        content:
          application/json:
            schema:
              type: object
              properties:
                state: {type: object}
                events: {type: array, items: {type: object}}
              required: [state, events]
      "400": {$ref: "#/components/responses/Error"}
      "401": {$ref: "#/components/responses/Error"}
      "404": {$ref: "#/components/responses/Error"}
    """
    backend: Backend = request.app.state.backend
    name = request.path_params["name"]
    raw = request.query_params.get("since") or None
    if raw is not None and not (raw.isdigit() and len(raw) <= 16):
        raise Rejected(400, "bad_request", "since must be a non-negative integer (ms)")
    state = await run_in_threadpool(backend.bundle_state, name)
    if state is None:
        raise UnknownDevice(name)
    events = await run_in_threadpool(
        functools.partial(backend.bundle_events, name, since=int(raw) if raw else None)
    )
    return JSONResponse({"state": state, "events": events})
