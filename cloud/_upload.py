"""``POST /v1/batches``: the upload endpoint of the sync wire protocol v1.

Cheap header checks first, then the device's secret, the body (bounded while streaming),
its signature, freshness and nonce, then decoding off the event loop and one durable
transaction.  At most ``max_inflight_uploads`` run at once (beyond: 503 with Retry-After).
Every refusal is logged in the backend's rejection log with its code, and answered with
the status :func:`cloud._http_errors.rejection_for` gives it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core._clock import now_ms
from protocol import _signing as signing

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
        return error_response(
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
    except CloudError as err:
        exc = rejection_for(err, upload=True)
        if exc is None:
            raise
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
        return error_response(exc)
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
        # Not the device's fault and not a bad signature: say so, loudly (the device is
        # answered 500 and keeps retrying until an operator fixes its stored credentials).
        log.error("cannot authenticate device %r: %s", device[:64], exc)
        ctx.device = device
        raise
    if secret is None:
        raise UnknownDevice(device)
    ctx.device = device

    # 2. The body, bounded while streaming; then who sent it.
    body = await _read_body(request, settings.max_body_bytes)
    if not signing.verify(
        secret, request.method, request.url.path, timestamp, nonce, body, signature
    ):
        raise Rejected(401, "bad_signature", UNKNOWN_DEVICE_OR_BAD_SIGNATURE)
    ctx.authenticated = True
    now = now_ms()
    if abs(now // 1000 - timestamp) > settings.max_skew_s:
        raise Rejected(
            401,
            "stale",
            f"timestamp is more than {settings.max_skew_s} s from the receiver's clock",
        )
    if await run_in_threadpool(backend.nonce_seen, device, nonce, now):
        raise NonceReplayed(device)

    # 3. Decode (CPU-bound: off the event loop), then store in one transaction.
    def decode() -> Any:
        data = decompress(
            body,
            encoding,
            settings.max_decompressed_bytes,
            max_ratio=settings.max_decompression_ratio,
        )
        return decode_upload(data, device, WireLimits.from_settings(settings), now=now)

    upload = await run_in_threadpool(decode)
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
    return JSONResponse({"acked": result.acked, "duplicates": result.duplicates})
