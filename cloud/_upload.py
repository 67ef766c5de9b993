"""``POST /v1/batches``: the upload endpoint of the sync wire protocol v1.

Authenticate before spending: cheap header checks first, then the device's secret and (for
a v2 signature, which covers the headers and the body's digest) the signature, freshness,
nonce and the device's rate -- all before a byte of the body is read.  The body is then read
within ``body_timeout_s`` while the request holds one of its device's places
(:mod:`cloud._admission`), checked against the signed digest, decoded off the event loop and
stored in one durable transaction on one of the ``max_inflight_uploads`` processing slots.

Only refusals of authenticated requests reach the backend's rejection log (and the device's
``last_error``); the others are counted in memory and sampled into the log, so a flood of
forged requests writes nothing.  An unknown device and a bad signature get the same answer.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from core._clock import now_ms
from protocol import _signing as signing

from ._admission import UploadGate
from ._backend import Backend
from ._errors import (
    CloudError,
    MasterKeyError,
    NonceReplayed,
    Rejected,
    SecretUnreadable,
    UnknownDevice,
)
from ._http_errors import UNKNOWN_DEVICE_OR_BAD_SIGNATURE, error_response, rejection_for
from ._settings import Settings
from ._wire import ENCODINGS, WireLimits, decode_upload, decompress

__all__ = ["post_batches"]

log = logging.getLogger("edgepipe.cloud")


class _Upload:
    """State of one upload request: who it proved to be, and the places it holds."""

    __slots__ = ("authenticated", "claimed", "device", "held")

    def __init__(self) -> None:
        self.device: str | None = None  # set once the request is known to come from it
        self.claimed: str | None = None
        self.authenticated = False  # set once its signature verified
        self.held: list[str] = []  # "device", "unverified", "processing"

    def release(self, gate: UploadGate) -> None:
        for place in self.held:
            if place == "device":
                gate.leave_device(self.claimed or "")
            elif place == "unverified":
                gate.leave_unverified()
            else:
                gate.leave_processing()
        self.held.clear()


#: Refusals that are counted but never written per request, even for a known device.
_UNLOGGED = frozenset({"rate_limited", "busy", "overloaded", "disconnected"})


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
      "408": {$ref: "#/components/responses/Error"}
      "409":
        description: A batch reuses a stored seq with different content; nothing was stored.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/SequenceConflict"}
      "413": {$ref: "#/components/responses/Error"}
      "415": {$ref: "#/components/responses/Error"}
      "429": {$ref: "#/components/responses/Overloaded"}
      "500": {$ref: "#/components/responses/Error"}
      "503": {$ref: "#/components/responses/Overloaded"}
    """
    state = request.app.state
    settings: Settings = state.settings
    gate: UploadGate = state.upload_gate
    ctx = _Upload()
    try:
        answer = await _receive(request, settings, state.backend, gate, ctx)
        if state.alerts is not None and ctx.device is not None:
            state.alerts.upload_arrived(ctx.device)  # its rules are evaluated soon
        return answer
    except CloudError as err:
        response = await _refused(request, gate, ctx, err)
        # Its traceback holds the decoder's frames (the decompressed body, the unpacker's
        # buffer) in a reference cycle: cut it, so they go with the answer rather than at
        # the next garbage collection, several refusals later.
        err.__traceback__ = None
        return response
    finally:
        ctx.release(gate)


async def _refused(request: Request, gate: UploadGate, ctx: _Upload, err: CloudError) -> Response:
    """The answer to a refused upload; only refusals of authenticated requests are
    written to the rejection log."""
    exc = rejection_for(err, upload=True)
    if exc is None:
        raise err
    remote = request.client.host if request.client else None
    if not ctx.authenticated and not isinstance(err, MasterKeyError | SecretUnreadable):
        reason = "unknown_device" if isinstance(err, UnknownDevice) else exc.code
        gate.refused_unauthenticated(reason, remote, ctx.claimed)
        return error_response(exc)
    if exc.code in _UNLOGGED:
        gate.refused_unauthenticated(exc.code, remote, ctx.claimed)
        return error_response(exc)
    try:
        await run_in_threadpool(
            functools.partial(
                request.app.state.backend.record_rejection,
                ctx.device,
                exc.code,
                exc.detail,
                remote,
                now_ms(),
                authenticated=ctx.authenticated,
            )
        )
    except Exception:  # the refusal itself must still reach the device
        log.exception("could not record a rejection")
    log.info("rejected upload from %s: %s %s", remote, exc.status, exc.code)
    return error_response(exc)


def _header(request: Request, name: str) -> str:
    value = request.headers.get(name)
    if not value:
        raise Rejected(401, "unauthenticated", f"missing header {name}")
    return value


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, bounded in size while streaming and in time (408 past ``timeout_s``)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Rejected(413, "too_large", f"body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer: counted, never a traceback
        raise Rejected(
            400, "disconnected", "the connection closed before the body arrived"
        ) from None
    except TimeoutError:
        raise Rejected(
            408,
            "timeout",
            f"the body did not arrive within {timeout_s:g} s",
            headers={"Connection": "close"},
        ) from None
    return b"".join(chunks)


def _busy(code: str, detail: str, retry_after: float) -> Rejected:
    status = 503 if code == "overloaded" else 429
    return Rejected(
        status, code, detail, headers={"Retry-After": str(max(1, int(retry_after + 0.999)))}
    )


async def _receive(
    request: Request, settings: Settings, backend: Backend, gate: UploadGate, ctx: _Upload
) -> Response:
    # 1. Cheap checks on headers, before reading anything or holding anything.
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit() or len(length) > 18:
            raise Rejected(400, "bad_request", "invalid Content-Length")
    ctype_raw = request.headers.get("content-type", signing.CONTENT_TYPE).strip()
    ctype = ctype_raw.split(";")[0].strip()
    if ctype != signing.CONTENT_TYPE:
        raise Rejected(
            415, "unsupported_media_type", f"Content-Type must be {signing.CONTENT_TYPE}"
        )
    encoding_raw = request.headers.get("content-encoding", "identity").strip()
    encoding = encoding_raw.lower()
    if encoding not in ENCODINGS:
        raise Rejected(
            415,
            "unsupported_encoding",
            f"Content-Encoding {encoding[:32]!r} is not supported; use one of {', '.join(ENCODINGS)}",
        )
    device = _header(request, signing.HEADER_DEVICE)
    ctx.claimed = device[:128]
    if len(device) > 128:
        raise Rejected(401, "unauthenticated", "X-Edgepipe-Device is longer than 128 characters")
    ts_raw = _header(request, signing.HEADER_TIMESTAMP)
    nonce = _header(request, signing.HEADER_NONCE)
    signature = _header(request, signing.HEADER_SIGNATURE)
    link_raw = request.headers.get(signing.HEADER_LINK, "unknown").strip()
    link = link_raw.lower()[:32] or "unknown"
    if not (ts_raw.lstrip("-").isdigit() and len(ts_raw) <= 20):
        raise Rejected(401, "unauthenticated", "X-Edgepipe-Timestamp must be integer seconds")
    timestamp = int(ts_raw)
    if not signing.is_valid_nonce(nonce):
        raise Rejected(401, "unauthenticated", "X-Edgepipe-Nonce must be 32 lowercase hex chars")
    v2 = signature.startswith(signing.SIGNATURE_PREFIX_V2)
    too_large = length is not None and int(length) > settings.max_body_bytes
    if too_large and not v2:
        raise _too_large(settings)
    if v2:
        digest = _header(request, signing.HEADER_DIGEST)
        if not signing.is_valid_digest(digest):
            raise Rejected(
                401, "unauthenticated", "X-Edgepipe-Content-SHA256 must be 64 lowercase hex chars"
            )
    elif signature.startswith(signing.SIGNATURE_PREFIX):
        if not settings.accept_v1_signatures:
            raise Rejected(
                401,
                "unauthenticated",
                "signature version 1 is not accepted by this receiver; upgrade the device",
            )
    else:
        raise Rejected(401, "unauthenticated", "X-Edgepipe-Signature must start with v2= or v1=")
    now = now_ms()
    stale = abs(now // 1000 - timestamp) > settings.max_skew_s
    if stale and not v2:  # nothing to authenticate it with before its body is in
        raise _stale(settings)

    try:
        secret = await run_in_threadpool(backend.get_device_secret, device)
    except (MasterKeyError, SecretUnreadable) as exc:
        # Not the device's fault and not a bad signature: say so, loudly (the device is
        # answered 500 and keeps retrying until an operator fixes its stored credentials).
        log.error("cannot authenticate device %r: %s", device[:64], exc)
        ctx.device = device
        raise
    if secret is None:
        raise UnknownDevice(device)

    if v2:
        # 2a. Who sent it, from the headers alone (the body's digest is signed).
        if not signing.verify_v2(
            secret,
            request.method,
            request.url.path,
            timestamp,
            nonce,
            ctype_raw,
            encoding_raw,
            link_raw,
            digest,
            signature,
        ):
            raise Rejected(401, "bad_signature", UNKNOWN_DEVICE_OR_BAD_SIGNATURE)
        ctx.authenticated, ctx.device = True, device
        if too_large:  # the device's own upload is too large: worth its rejection log
            raise _too_large(settings)
        if stale:
            raise _stale(settings)
        await _admit(settings, backend, gate, ctx, device, nonce, now)
        gate.reading += 1
        try:
            body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        finally:
            gate.reading -= 1
        if hashlib.sha256(body).hexdigest() != digest:
            ctx.authenticated, ctx.device = False, None  # the body is not what was signed
            raise Rejected(401, "bad_signature", UNKNOWN_DEVICE_OR_BAD_SIGNATURE)
    else:
        # 2b. Version 1: the body first (on a bounded place, within the deadline).
        if not gate.enter_unverified():
            raise _busy(
                "overloaded", "too many uploads in progress; retry later", settings.retry_after_s
            )
        ctx.held.append("unverified")
        gate.reading += 1
        try:
            body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        finally:
            gate.reading -= 1
        if not signing.verify(
            secret, request.method, request.url.path, timestamp, nonce, body, signature
        ):
            raise Rejected(401, "bad_signature", UNKNOWN_DEVICE_OR_BAD_SIGNATURE)
        ctx.authenticated, ctx.device = True, device
        await _admit(settings, backend, gate, ctx, device, nonce, now)

    # 3. Decode (CPU-bound: off the event loop), then store in one transaction.
    if not gate.enter_processing():
        raise _busy(
            "overloaded", "too many uploads in progress; retry later", settings.retry_after_s
        )
    ctx.held.append("processing")

    def decode() -> Any:
        data = decompress(
            body,
            encoding,
            settings.max_decompressed_bytes,
            max_ratio=settings.max_decompression_ratio,
        )
        return decode_upload(data, device, WireLimits.from_settings(settings), now=now)

    upload = await run_in_threadpool(decode)
    upload.clock_skew_ms = timestamp * 1000 - now  # the signed timestamp (1 s resolution)
    clock_flags = request.app.state.clock_flags
    flagged = clock_flags.mark(upload)  # readings of a device whose clock is far off
    # A nonce must be remembered until its timestamp can no longer pass the skew check.
    expires = (max(timestamp * 1000, now) + 2 * settings.max_skew_s * 1000) + 1000
    # UnknownDevice if it was removed while we were decoding; SequenceConflict, NonceReplayed.
    result = await run_in_threadpool(
        backend.ingest,
        upload,
        link=link,
        nbytes=len(body),
        nonce=nonce,
        nonce_expires=expires,
        now=now,
    )
    gate.accepted += 1
    clock_flags.stored(upload, result.readings if flagged else 0)  # duplicates: not again
    return JSONResponse(
        {"acked": result.acked, "duplicates": result.duplicates},
        headers={"X-Edgepipe-Time": str(now_ms())},  # the device's clock-skew estimate
    )


def _too_large(settings: Settings) -> Rejected:
    return Rejected(413, "too_large", f"body exceeds the limit of {settings.max_body_bytes} bytes")


def _stale(settings: Settings) -> Rejected:
    return Rejected(
        401,
        "stale",
        f"timestamp is more than {settings.max_skew_s} s from the receiver's clock",
    )


async def _admit(
    settings: Settings,
    backend: Backend,
    gate: UploadGate,
    ctx: _Upload,
    device: str,
    nonce: str,
    now: int,
) -> None:
    """An authenticated request's nonce, its device's rate and one of its device's places."""
    if await run_in_threadpool(backend.nonce_seen, device, nonce, now):
        raise NonceReplayed(device)
    wait = gate.rate.take(device)
    if wait is not None:
        raise _busy("rate_limited", "too many uploads from this device; retry later", wait)
    if not gate.enter_device(device):
        raise _busy(
            "busy",
            f"this device already has {settings.max_inflight_per_device} uploads in progress",
            settings.retry_after_s,
        )
    ctx.held.append("device")
