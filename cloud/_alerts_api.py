"""``GET /v1/alerts``: the alerts (firing and recently resolved), the rules and the
webhooks' delivery counters, for operators (docs/alerts.md)."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._auth import operator_endpoint
from ._errors import Rejected

__all__ = ["list_alerts"]

_STATES = ("firing", "resolved", "all")


@operator_endpoint
async def list_alerts(request: Request) -> Response:
    """Alerts, newest change first, with the rules and the webhooks' counters.
    ---
    summary: Alerts (firing and resolved) and their webhooks
    operationId: listAlerts
    tags: [read]
    security: [{operatorBearer: []}]
    parameters:
      - {name: state, in: query, schema: {type: string, enum: [firing, resolved, all], default: all}}
      - {$ref: "#/components/parameters/DeviceFilter"}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 1000, default: 200}}
    responses:
      "200":
        description: Alerts; `engine` is null when the receiver has no alert rules.
        content:
          application/json:
            schema:
              type: object
              properties:
                alerts: {type: array, items: {$ref: "#/components/schemas/Alert"}}
                engine: {$ref: "#/components/schemas/AlertEngine"}
              required: [alerts, engine]
      "400": {$ref: "#/components/responses/Error"}
      "401": {$ref: "#/components/responses/Error"}
    """
    p = request.query_params
    state = p.get("state") or "all"
    if state not in _STATES:
        raise Rejected(400, "bad_query", "state must be firing, resolved or all")
    raw = p.get("limit") or "200"
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= 1000:
        raise Rejected(400, "bad_query", "limit must be an integer between 1 and 1000")
    device = p.get("device") or None
    backend = request.app.state.backend
    engine = getattr(request.app.state, "alerts", None)

    def load() -> list[dict[str, Any]]:
        rows = backend.alerts(None if state == "all" else state, device, int(raw))
        return [r.as_json() for r in rows]

    alerts = await run_in_threadpool(load)
    return JSONResponse(
        {"alerts": alerts, "engine": engine.snapshot() if engine is not None else None}
    )
