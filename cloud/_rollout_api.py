"""Rollouts over HTTP: the operator API (``/v1/rollouts``, list, detail with the timeline,
``pause`` / ``resume`` / ``abort``) and the dashboard's rollout pages (``/rollouts``,
``/rollouts/{id}``), filled and refreshed by the page script.

Every route needs an operator (a dashboard session or the API bearer token).  An action
from a session is a state-changing request: its ``Origin`` must be this site and it must
carry the session's CSRF token (``X-Edgepipe-CSRF`` header, or the form field ``csrf``),
exactly like signing out; the bearer token carries no cookie, so needs neither.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core._clock import Clock

from . import _auth as auth
from ._errors import Rejected
from ._rollout import RolloutEngine
from ._rollout_store import UnknownRollout
from ._settings import Settings

__all__ = ["CSRF_HEADER", "engine", "page_routes", "routes"]

CSRF_HEADER = "x-edgepipe-csrf"


def engine(backend: Any, settings: Settings, clock: Clock) -> RolloutEngine:
    """The app's rollout engine."""
    return RolloutEngine(backend, clock=clock, every_s=settings.rollout_evaluate_s)


def _engine(request: Request) -> RolloutEngine:
    eng = request.app.state.rollouts
    if eng is None:  # an app not started by its lifespan (never in a real server)
        eng = request.app.state.rollouts = engine(
            request.app.state.backend, request.app.state.settings, _system()
        )
    return eng


def _system() -> Clock:
    from core._clock import SYSTEM_CLOCK

    return SYSTEM_CLOCK


def _rollout_id(request: Request) -> int:
    raw = request.path_params["rid"]
    if not raw.isdigit() or len(raw) > 18:
        raise Rejected(404, "not_found", "no such rollout")
    return int(raw)


def rollout_detail(backend: Any, rid: int) -> dict[str, Any]:
    ro = backend.rollout(rid)
    if ro is None:
        raise Rejected(404, "not_found", f"no rollout {rid}")
    counts: dict[str, int] = {}
    for d in ro["devices"]:
        counts[d["state"]] = counts.get(d["state"], 0) + 1
    ro["counts"] = counts
    ro["events"] = backend.rollout_events(rid)
    return ro


@auth.operator_endpoint
async def list_rollouts(request: Request) -> Response:
    """Rollouts, newest first, with their devices' counts per state.
    ---
    summary: List rollouts
    operationId: listRollouts
    tags: [read]
    security: [{operatorBearer: []}]
    responses:
      "200":
        description: Rollouts.
        content:
          application/json:
            schema: {type: object, properties: {rollouts: {type: array}}}
      "401": {$ref: "#/components/responses/Error"}
    """
    rows = await run_in_threadpool(request.app.state.backend.list_rollouts)
    return JSONResponse({"rollouts": rows})


@auth.operator_endpoint
async def get_rollout(request: Request) -> Response:
    """One rollout: its waves, devices per state with reasons, and its timeline.
    ---
    summary: Get a rollout
    operationId: getRollout
    tags: [read]
    security: [{operatorBearer: []}]
    parameters:
      - {name: rid, in: path, required: true, schema: {type: integer}}
    responses:
      "200":
        description: The rollout.
        content:
          application/json:
            schema: {type: object}
      "401": {$ref: "#/components/responses/Error"}
      "404": {$ref: "#/components/responses/Error"}
    """
    rid = _rollout_id(request)
    return JSONResponse(await run_in_threadpool(rollout_detail, request.app.state.backend, rid))


@auth.operator_endpoint
async def act_on_rollout(request: Request) -> Response:
    """Pause, resume or abort a rollout (a session also needs its CSRF token).
    ---
    summary: Pause, resume or abort a rollout
    operationId: actOnRollout
    tags: [read]
    security: [{operatorBearer: []}]
    parameters:
      - {name: rid, in: path, required: true, schema: {type: integer}}
      - {name: action, in: path, required: true, schema: {type: string, enum: [pause, resume, abort]}}
    responses:
      "200":
        description: The rollout after the action.
        content:
          application/json:
            schema: {type: object}
      "401": {$ref: "#/components/responses/Error"}
      "403": {$ref: "#/components/responses/Error"}
      "404": {$ref: "#/components/responses/Error"}
      "409": {$ref: "#/components/responses/Error"}
    """
    rid = _rollout_id(request)
    action = request.path_params["action"]
    if action not in ("pause", "resume", "abort"):
        raise Rejected(404, "not_found", "the actions are pause, resume and abort")
    session = await auth.current_session(request)
    if session is not None:
        auth.check_origin(request)
        given = request.headers.get(CSRF_HEADER)
        if given is None and request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            given = (await auth.read_form(request)).get("csrf")
        if not auth.tokens_equal(given or "", session["csrf"]):
            raise Rejected(403, "csrf", "CSRF token missing or wrong")
    who = str(request.state.operator)
    eng = _engine(request)
    try:
        await run_in_threadpool(eng.act, rid, action, who)
    except UnknownRollout:
        raise Rejected(404, "not_found", f"no rollout {rid}") from None
    except ValueError as e:
        raise Rejected(409, "conflict", str(e)) from None
    return JSONResponse(await run_in_threadpool(rollout_detail, request.app.state.backend, rid))


# -- pages ----------------------------------------------------------------------------------
async def rollouts_page(request: Request) -> Response:
    from ._pages import login_redirect, page

    session = await auth.current_session(request)
    if session is None:
        return login_redirect(request)
    body = """
<div class="head"><h1>Rollouts</h1><span class="live" id="live">live</span></div>
<section class="card wide">
  <div class="table-wrap"><table id="rollouts" class="grid">
    <thead><tr><th>Rollout</th><th>Bundle</th><th>Group</th><th>State</th><th>Wave</th>
    <th>Devices</th><th>Reason</th><th>Started</th></tr></thead>
    <tbody><tr><td colspan="8" class="muted">Loading…</td></tr></tbody>
  </table></div>
</section>"""
    return page(request, "Rollouts", body, page="rollouts", session=session)


async def rollout_page(request: Request) -> Response:
    from ._pages import login_redirect, page

    session = await auth.current_session(request)
    if session is None:
        return login_redirect(request)
    rid = _rollout_id(request)
    body = f"""
<div class="head"><h1><a href="/rollouts" class="crumb">Rollouts</a> / rollout {rid}</h1>
<span class="badge" id="rollout-state">…</span><span class="live" id="live">live</span></div>
<section class="card wide" id="rollout-summary" aria-label="Rollout"></section>
<div class="toolbar" id="rollout-actions">
  <button type="button" data-action="pause" hidden>Pause</button>
  <button type="button" data-action="resume" hidden>Resume</button>
  <button type="button" data-action="abort" class="danger" hidden>Abort</button>
  <span class="muted small" id="rollout-message" role="status"></span>
</div>
<section class="card wide"><h2>Devices by wave</h2>
  <div id="rollout-waves"></div></section>
<section class="card wide"><h2>Timeline</h2>
  <div class="table-wrap"><table class="grid" id="rollout-events"><tbody></tbody></table></div></section>"""
    return page(
        request,
        f"Rollout {rid}",
        body,
        page="rollout",
        session=session,
        data={"rollout": str(rid), "csrf": session["csrf"]},
    )


def routes() -> list[BaseRoute]:
    """The API (mounted with the receiver's other ``/v1`` routes)."""
    return [
        Route("/v1/rollouts", list_rollouts, methods=["GET"]),
        Route("/v1/rollouts/{rid}", get_rollout, methods=["GET"]),
        Route("/v1/rollouts/{rid}/{action}", act_on_rollout, methods=["POST"]),
    ]


def page_routes() -> list[BaseRoute]:
    """The dashboard's rollout pages."""
    return [
        Route("/rollouts", rollouts_page, methods=["GET"]),
        Route("/rollouts/{rid}", rollout_page, methods=["GET"]),
    ]
