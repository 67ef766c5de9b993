"""The read API of device health (docs/health.md): a device's health snapshots with the
badges they raise, and its warning log with level, text search and time range."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core._clock import now_ms

from ._auth import operator_endpoint
from ._badges import Thresholds, badges
from ._errors import Rejected, UnknownDevice

__all__ = ["LOG_PAGE_MAX", "badges", "device_health", "device_logs", "fleet_logs", "thresholds"]

#: Most log records one page holds.
LOG_PAGE_MAX = 1000
_LEVELS = ("WARNING", "ERROR", "CRITICAL")


def thresholds(request: Request) -> Thresholds:
    """The receiver's badge thresholds (its ``badge_*`` settings)."""
    return Thresholds.from_settings(request.app.state.dashboard)


def _int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        v = int(raw)
    except ValueError:
        raise Rejected(400, "bad_request", f"{name} must be an integer") from None
    if not 0 <= v < 2**53:
        raise Rejected(400, "bad_request", f"{name} is out of range")
    return v


@operator_endpoint
async def device_health(request: Request) -> Response:
    """A device's health snapshots (oldest first) and the badges they raise.
    ---
    summary: Health snapshots of one device
    operationId: deviceHealth
    tags: [read]
    security: [{operatorBearer: []}]
    parameters:
      - {$ref: "#/components/parameters/Name"}
      - {name: since, in: query, description: "ms since epoch, inclusive", schema: {type: integer, minimum: 0, maximum: 9007199254740991}}
      - {name: until, in: query, description: "ms since epoch, exclusive", schema: {type: integer, minimum: 0, maximum: 9007199254740991}}
      - {name: limit, in: query, schema: {type: integer, maximum: 5000}}
    responses:
      "200":
        description: Snapshots and badges.
        content:
          application/json:
            schema:
              type: object
              properties:
                device: {type: string}
                snapshots: {type: array, items: {type: object}}
                badges: {type: array, items: {type: object}}
              required: [device, snapshots, badges]
      "400": {$ref: "#/components/responses/Error"}
      "401": {$ref: "#/components/responses/Error"}
      "404": {$ref: "#/components/responses/Error"}
    """
    backend = request.app.state.backend
    name = request.path_params["name"]
    since, until = _int(request, "since"), _int(request, "until")
    limit = min(_int(request, "limit") or 2000, 5000)

    th = thresholds(request)

    def load() -> dict[str, Any]:
        device = backend.get_device(name)
        if device is None:
            raise UnknownDevice(name)
        snaps = backend.device_health(name, since, until, limit)
        found = badges(snaps, device.get("reported"), now_ms(), th, device.get("last_seen_ms"))
        return {"device": name, "snapshots": snaps, "badges": found}

    return JSONResponse(await run_in_threadpool(load))


_LOG_PARAMS = """
      - {name: level, in: query, description: "this level and above", schema: {type: string, enum: [WARNING, ERROR, CRITICAL]}}
      - {name: q, in: query, description: "case-insensitive substring of the message", schema: {type: string, maxLength: 200}}
      - {name: since, in: query, description: "ms since epoch, inclusive", schema: {type: integer, minimum: 0, maximum: 9007199254740991}}
      - {name: until, in: query, description: "ms since epoch, exclusive", schema: {type: integer, minimum: 0, maximum: 9007199254740991}}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 1000, default: 100}}
      - {name: before, in: query, description: "the next page: the `next` cursor of the previous one", schema: {type: string, pattern: "^[0-9]{1,16}[.][0-9]{1,16}[.][0-9]{1,16}$"}}
"""


def _log_query(request: Request) -> dict[str, Any]:
    """The log view's bounded query parameters, or 400."""
    p = request.query_params
    text = p.get("q") or None
    if text is not None and len(text) > 200:
        raise Rejected(400, "bad_request", "q is longer than 200 characters")
    level = (p.get("level") or "").upper() or None
    if level is not None and level not in _LEVELS:
        raise Rejected(400, "bad_request", f"level must be one of {', '.join(_LEVELS)}")
    limit = _int(request, "limit")
    if limit is not None and not 1 <= limit <= LOG_PAGE_MAX:
        raise Rejected(400, "bad_request", f"limit must be between 1 and {LOG_PAGE_MAX}")
    before = None
    raw = p.get("before")
    if raw:
        parts = raw.split(".")
        if len(parts) != 3 or not all(x.isascii() and x.isdigit() and len(x) <= 16 for x in parts):
            raise Rejected(400, "bad_request", "before must be a cursor from a previous page")
        ts, did, seq = (int(x) for x in parts)
        before = (ts, did, seq)
    since, until = _int(request, "since"), _int(request, "until")
    return {
        "level": level,
        "text": text,
        "since": since,
        "until": until,
        "limit": limit or 100,
        "before": before,
    }


def _page(rows: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """A page of log records and the cursor of the next (None: this is the last)."""
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = rows[-1]["cursor"] if more and rows else None
    for r in rows:
        del r["cursor"]
    return {"logs": rows, "next": nxt}


_LOG_RESPONSE = """
    responses:
      "200":
        description: Log records, newest first (each de-duplicated, with its count `n` and first and last time `ts`, `last`), and the cursor of the next page (null on the last).
        content:
          application/json:
            schema:
              type: object
              properties:
                logs: {type: array, items: {$ref: "#/components/schemas/LogRecord"}}
                next: {type: [string, "null"]}
              required: [logs, next]
      "400": {$ref: "#/components/responses/Error"}
      "401": {$ref: "#/components/responses/Error"}
"""


async def _logs(request: Request, device: str | None, *, known: bool) -> Response:
    """A page of log records of ``device`` (None: every device); ``known``: 404 for a
    device that is not registered."""
    backend = request.app.state.backend
    q = _log_query(request)
    limit = q.pop("limit")

    def load() -> dict[str, Any]:
        if known and backend.get_device(device) is None:
            raise UnknownDevice(str(device))
        page = _page(backend.logs(device, limit=limit + 1, **q), limit)
        return {"device": device, **page} if known else page

    return JSONResponse(await run_in_threadpool(load))


@operator_endpoint
async def device_logs(request: Request) -> Response:
    return await _logs(request, request.path_params["name"], known=True)


@operator_endpoint
async def fleet_logs(request: Request) -> Response:
    return await _logs(request, request.query_params.get("device") or None, known=False)


def _log_doc(head: str, summary: str, operation: str, param: str, extra: str = "") -> str:
    return (
        f"""{head}
    ---
    summary: {summary}
    operationId: {operation}
    tags: [read]
    security: [{{operatorBearer: []}}]
    parameters:
      - {{$ref: "#/components/parameters/{param}"}}"""
        + _LOG_PARAMS
        + _LOG_RESPONSE
        + extra
    )


device_logs.__doc__ = _log_doc(
    "A device's warning log, newest first, in bounded pages.",
    "Warning log of one device",
    "deviceLogs",
    "Name",
    """      "404": {$ref: "#/components/responses/Error"}\n""",
)
fleet_logs.__doc__ = _log_doc(
    "The warning logs of every device (or of one), newest first, in bounded pages.",
    "Warning logs of the fleet",
    "fleetLogs",
    "DeviceFilter",
)
