"""The app layer's one map from domain errors to HTTP: status, code and detail.

The backend raises domain errors (:mod:`cloud._errors`); the endpoints let them propagate
and this module turns each into the :class:`Rejected` the client sees, and installs the
exception handlers that render every refusal as ``{"error": code, "detail": detail, ...}``.

Uploads get their own answers where telling more would help an attacker: a device that is
unknown (or was removed while its upload was decoded) gets byte for byte the answer of a bad
signature.

:class:`SecurityHeaders` adds ``Cache-Control: no-store`` and ``X-Content-Type-Options:
nosniff`` to every response of the app (API answers carry operator data and must not be kept
by caches; no answer may be sniffed into another type); :class:`RefuseNul` answers a URL
with a NUL character 400 before any endpoint sees it (PostgreSQL refuses such text: it was
an internal error on every route that passes a parameter to the database).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._errors import (
    CloudError,
    MasterKeyError,
    NonceReplayed,
    Rejected,
    SecretUnreadable,
    SequenceConflict,
    SeriesLimitExceeded,
    UnknownDevice,
)

__all__ = ["RefuseNul", "SecurityHeaders", "error_response", "exception_handlers", "rejection_for"]

log = logging.getLogger("edgepipe.cloud")

#: The answer to an upload that names no registered device, or fails its signature.
UNKNOWN_DEVICE_OR_BAD_SIGNATURE = "unknown device or bad signature"


def rejection_for(exc: CloudError, *, upload: bool = False) -> Rejected | None:
    """The HTTP refusal for ``exc`` (``upload``: raised while handling ``POST /v1/batches``);
    None for an error that no request should cause (answered as an internal error)."""
    if isinstance(exc, Rejected):
        return exc
    if isinstance(exc, UnknownDevice):
        if upload:
            return Rejected(401, "bad_signature", UNKNOWN_DEVICE_OR_BAD_SIGNATURE)
        return Rejected(404, "not_found", f"no device named {exc.name[:64]!r}")
    if isinstance(exc, SequenceConflict):
        return Rejected(409, "sequence_conflict", str(exc), seq=exc.seq)
    if isinstance(exc, SeriesLimitExceeded):
        # Per request: 413, so the device sends fewer batches at once; per device: 422.
        if exc.scope == "request":
            return Rejected(413, "too_many_series", str(exc), limit=exc.limit)
        return Rejected(422, "series_limit", str(exc), limit=exc.limit)
    if isinstance(exc, NonceReplayed):
        return Rejected(401, "replay", str(exc))
    if isinstance(exc, MasterKeyError | SecretUnreadable):
        # Not the device's fault and not a bad signature: keep the device retrying (5xx)
        # until an operator fixes the receiver's key or the device's stored credentials.
        return Rejected(
            500,
            "secret_unreadable",
            "the receiver cannot use its stored credentials for this device; see the receiver log",
        )
    return None


def error_response(exc: Rejected) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _cloud_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CloudError)
    rejected = rejection_for(exc)
    if rejected is None:
        return await _internal(request, exc)
    return error_response(rejected)


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


def exception_handlers() -> dict[type[Exception], object]:
    """For ``Starlette(exception_handlers=...)``."""
    return {CloudError: _cloud_error, HTTPException: _http_error, Exception: _internal}


class SecurityHeaders:
    """ASGI middleware: ``X-Content-Type-Options: nosniff`` on every response and
    ``Cache-Control: no-store`` on every one but the static assets (``/static/``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cacheable = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in _SET or (cacheable and k.lower() == b"cache-control")
                ]
                headers.append((b"x-content-type-options", b"nosniff"))
                if not cacheable:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_SET = frozenset({b"x-content-type-options", b"cache-control"})


class RefuseNul:
    """ASGI middleware: a request whose path or query string carries a NUL character
    (``%00``) is answered ``400 bad_request`` -- no name, text or cursor of this API holds
    one."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b"")
        ):
            refused = Rejected(400, "bad_request", "the URL contains a NUL character (%00)")
            await error_response(refused)(scope, receive, send)
            return
        await self.app(scope, receive, send)
