"""The read API of device health (docs/health.md): a device's health snapshots with the
badges they raise, and its warning log with level, text search and time range."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core._clock import now_ms

from ._auth import operator_endpoint
from ._errors import Rejected, UnknownDevice

__all__ = ["BADGE_DEFAULTS", "badges", "device_health", "device_logs"]

#: Badge thresholds: store fill (fraction of the quota), clock skew (ms), silence (ms).
BADGE_DEFAULTS = {"store_fill": 0.8, "clock_skew_ms": 30_000, "silent_ms": 600_000}


def badges(
    snapshots: list[dict[str, Any]],
    status: dict[str, Any] | None,
    now: int,
    thresholds: dict[str, float] = BADGE_DEFAULTS,
) -> list[dict[str, Any]]:
    """The badges a device's newest health raises, each naming its evidence (the snapshot
    ``seq`` and the key): store > 80 %, breaker open, session lost, clock skew, silent."""
    out: list[dict[str, Any]] = []
    if not snapshots:
        return out
    last = snapshots[-1]
    v = last["values"]
    quota = v.get("store_quota_b") or 0
    if quota and v.get("store_used_b", 0) / quota > thresholds["store_fill"]:
        fill = v["store_used_b"] / quota
        out.append(_badge("store_full", f"store {fill:.0%} of its quota", last, "store_used_b"))
    for k, x in sorted(v.items()):
        if k.startswith("breaker_open:") and x:
            out.append(_badge("breaker_open", f"stage {k[13:]} breaker open", last, k))
    first = snapshots[0]["values"].get("sessions_lost", 0)
    if v.get("sessions_lost", 0) > first:
        out.append(_badge("session_lost", "MQTT session lost", last, "sessions_lost"))
    skew = v.get("clock_skew_ms", v.get("receiver_skew_ms", (status or {}).get("clock_skew_ms")))
    if isinstance(skew, int) and abs(skew) > thresholds["clock_skew_ms"]:
        out.append(
            _badge("clock_skew", f"clock off by {skew / 1000:+.0f} s", last, "clock_skew_ms")
        )
    if now - last["ts"] > thresholds["silent_ms"]:
        out.append(_badge("silent", "no health report recently", last, "ts"))
    return out


def _badge(kind: str, text: str, snap: dict[str, Any], key: str) -> dict[str, Any]:
    return {"badge": kind, "text": text, "seq": snap["seq"], "ts": snap["ts"], "key": key}


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

    def load() -> dict[str, Any]:
        device = backend.get_device(name)
        if device is None:
            raise UnknownDevice(name)
        snaps = backend.device_health(name, since, until, limit)
        return {
            "device": name,
            "snapshots": snaps,
            "badges": badges(snaps, device.get("status"), now_ms()),
        }

    return JSONResponse(await run_in_threadpool(load))


@operator_endpoint
async def device_logs(request: Request) -> Response:
    """A device's warning log, newest first.
    ---
    summary: Warning log of one device
    operationId: deviceLogs
    tags: [read]
    security: [{operatorBearer: []}]
    parameters:
      - {$ref: "#/components/parameters/Name"}
      - {name: level, in: query, schema: {type: string, enum: [WARNING, ERROR, CRITICAL]}}
      - {name: q, in: query, schema: {type: string, maxLength: 200}}
      - {name: since, in: query, description: "ms since epoch, inclusive", schema: {type: integer, minimum: 0, maximum: 9007199254740991}}
      - {name: until, in: query, description: "ms since epoch, exclusive", schema: {type: integer, minimum: 0, maximum: 9007199254740991}}
      - {name: limit, in: query, schema: {type: integer, maximum: 5000}}
    responses:
      "200":
        description: Log records (each de-duplicated, with its count).
        content:
          application/json:
            schema:
              type: object
              properties:
                device: {type: string}
                logs: {type: array, items: {type: object}}
              required: [device, logs]
      "400": {$ref: "#/components/responses/Error"}
      "401": {$ref: "#/components/responses/Error"}
      "404": {$ref: "#/components/responses/Error"}
    """
    backend = request.app.state.backend
    name = request.path_params["name"]
    text = request.query_params.get("q") or None
    if text is not None and len(text) > 200:
        raise Rejected(400, "bad_request", "q is longer than 200 characters")
    level = request.query_params.get("level") or None
    since, until = _int(request, "since"), _int(request, "until")
    limit = min(_int(request, "limit") or 500, 5000)

    def load() -> dict[str, Any]:
        if backend.get_device(name) is None:
            raise UnknownDevice(name)
        logs = backend.device_logs(
            name, level=level, text=text, since=since, until=until, limit=limit
        )
        return {"device": name, "logs": logs}

    return JSONResponse(await run_in_threadpool(load))
