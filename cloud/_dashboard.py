"""The operator dashboard: server-rendered page shells plus small JSON endpoints that the
page script (``cloud/static/dashboard.js``, built from ``web/``) polls for live updates.

Pages: ``/`` (fleet overview), ``/devices/{name}`` (charts of one device), ``/logs``
(dead letters and rejected requests), ``/login``.  JSON: ``/ui/api/fleet``,
``/ui/api/series``, ``/ui/api/logs``.  Everything but the login page needs an operator
session (see :mod:`cloud._auth`); a device signature opens none of it.

Charts are always bucketed on the server: a range is cut into at most :data:`MAX_POINTS`
buckets of a "nice" width, the backend aggregates each bucket (avg/min/max/count, from the
hourly rollup for whole-hour buckets), and empty buckets are sent as ``null`` so a device's
offline period shows as a gap -- which fills once its backlog arrives.
"""

from __future__ import annotations

import hashlib
import html
import logging
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from core._clock import now_ms

from . import _auth as auth
from ._app import operator_endpoint
from ._backend import ROLLUP_MS, ReadingsQuery
from ._errors import Rejected, UnknownDevice
from ._settings import ENV_PREFIX

__all__ = ["DashboardSettings", "dashboard_routes"]

log = logging.getLogger("edgepipe.cloud.dashboard")

STATIC = Path(__file__).with_name("static")
#: Most buckets a chart request returns (per series).
MAX_POINTS = 900
RANGES_MS = {
    "15m": 15 * 60_000,
    "1h": 3_600_000,
    "6h": 6 * 3_600_000,
    "24h": 24 * 3_600_000,
    "7d": 7 * 86_400_000,
    "30d": 30 * 86_400_000,
    "1y": 365 * 86_400_000,
}
_S, _M, _H, _D = 1000, 60_000, 3_600_000, 86_400_000
STEPS_MS = [
    *(n * _S for n in (1, 2, 5, 10, 15, 30)),
    *(n * _M for n in (1, 2, 5, 10, 15, 30)),
    *(n * _H for n in (1, 2, 3, 6, 12)),
    *(n * _D for n in (1, 2, 7, 14, 30)),
]


class DashboardSettings(BaseModel):
    """Dashboard knobs; each also comes from ``EDGEPIPE_CLOUD_<FIELD>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: A device is shown offline when its last upload is older than this.
    offline_after_s: float = Field(300, gt=0)
    #: How often open pages fetch fresh data.
    refresh_s: float = Field(5, gt=0)
    session_ttl_s: int = Field(12 * 3600, ge=60)
    #: Secure cookies: None = when the request came over TLS; true behind a TLS proxy.
    secure_cookies: bool | None = None
    login_max_failures: int = Field(5, ge=1)
    login_window_s: int = Field(300, ge=1)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DashboardSettings:
        env = os.environ if environ is None else environ
        values = {
            name: env[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if env.get(ENV_PREFIX + name.upper()) not in (None, "")
        }
        return cls(**values)


# -- HTML ---------------------------------------------------------------------------------------
def _asset_version() -> str:
    h = hashlib.sha256()
    for name in ("dashboard.js", "dashboard.css"):
        p = STATIC / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


_VERSION = _asset_version()
_e = html.escape

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _page(
    request: Request,
    title: str,
    body: str,
    *,
    page: str,
    session: dict[str, Any] | None,
    data: dict[str, str] | None = None,
    status: int = 200,
) -> HTMLResponse:
    s: DashboardSettings = request.app.state.dashboard
    attrs = {
        "page": page,
        "refresh-ms": str(int(s.refresh_s * 1000)),
        "offline-ms": str(int(s.offline_after_s * 1000)),
        **(data or {}),
    }
    data_attrs = " ".join(f'data-{k}="{_e(v)}"' for k, v in attrs.items())
    nav = ""
    if session is not None:
        links = [("fleet", "/", "Fleet"), ("logs", "/logs", "Logs")]
        nav = (
            '<nav class="nav">'
            + "".join(
                f'<a href="{href}"{" aria-current=page" if key == page else ""}>{label}</a>'
                for key, href, label in links
            )
            + "</nav>"
            + '<form class="who" method="post" action="/logout">'
            + f'<input type="hidden" name="csrf" value="{_e(session["csrf"])}">'
            + f'<span class="operator">{_e(session["operator"])}</span>'
            + '<button type="submit" class="link">Log out</button></form>'
        )
    doc = f"""<!doctype html>
<html lang="en"><head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light">
<title>{_e(title)} · edgepipe</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/dashboard.css?v={_VERSION}">
<script src="/static/dashboard.js?v={_VERSION}" defer></script>
</head>
<body {data_attrs}>
<header class="top"><a class="brand" href="/"><span class="logo" aria-hidden="true"></span>edgepipe<small>cloud</small></a>{nav}</header>
<main>{body}</main>
</body></html>"""
    return HTMLResponse(doc, status_code=status, headers=_SECURITY_HEADERS)


def _login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


def _safe_next(value: str | None) -> str:
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


# -- login / logout -------------------------------------------------------------------------
def _login_form(request: Request, csrf: str, *, error: str = "", name: str = "", status: int = 200):
    nxt = _safe_next(request.query_params.get("next"))
    alert = f'<p class="alert" role="alert">{_e(error)}</p>' if error else ""
    body = f"""
<section class="login card">
  <h1>Operator sign-in</h1>
  <p class="muted">edgepipe cloud receiver · fleet dashboard</p>
  {alert}
  <form method="post" action="/login?next={quote(nxt, safe="")}" autocomplete="on">
    <input type="hidden" name="csrf" value="{_e(csrf)}">
    <label>User name<input name="username" autocomplete="username" required autofocus value="{_e(name)}"></label>
    <label>Password<input name="password" type="password" autocomplete="current-password" required></label>
    <button type="submit" class="primary">Sign in</button>
  </form>
</section>"""
    resp = _page(request, "Sign in", body, page="login", session=None, status=status)
    auth.set_cookie(request, resp, auth.CSRF_COOKIE, csrf, 3600)
    return resp


async def login_page(request: Request) -> Response:
    if await auth.current_session(request) is not None:
        return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
    return _login_form(request, auth.new_token())


async def login_submit(request: Request) -> Response:
    s: DashboardSettings = request.app.state.dashboard
    limiter: auth.LoginLimiter = request.app.state.login_limiter
    backend = request.app.state.backend
    auth.check_origin(request)
    form = await auth.read_form(request)
    name = form.get("username", "")[:128].strip()
    password = form.get("password", "")[:1024]
    cookie_csrf = request.cookies.get(auth.CSRF_COOKIE)
    if not auth.tokens_equal(form.get("csrf", ""), cookie_csrf):
        log.info("login refused: CSRF token missing or wrong")
        return _login_form(
            request,
            auth.new_token(),
            error="Your sign-in form expired. Please try again.",
            name=name,
            status=403,
        )
    ip = request.client.host if request.client else "unknown"
    keys = [f"ip:{ip}", f"user:{name.lower()}"]
    wait = limiter.retry_after(keys)
    if wait is not None:
        resp = _login_form(
            request,
            cookie_csrf or auth.new_token(),
            error=f"Too many failed sign-ins. Try again in {wait} s.",
            name=name,
            status=429,
        )
        resp.headers["Retry-After"] = str(wait)
        return resp
    pwhash = await run_in_threadpool(backend.operator_hash, name) if name else None
    ok = await run_in_threadpool(auth.verify_password, pwhash, password)
    if not ok:
        limiter.failed(keys)
        log.info("failed sign-in for %r from %s", name[:64], ip)
        return _login_form(
            request,
            cookie_csrf or auth.new_token(),
            error="Wrong user name or password.",
            name=name,
            status=401,
        )
    limiter.succeeded(f"user:{name.lower()}")
    if pwhash is not None and auth.needs_rehash(pwhash):
        await run_in_threadpool(backend.set_operator_hash, name, auth.hash_password(password))
    token, now = auth.new_token(), now_ms()
    await run_in_threadpool(
        backend.create_session,
        auth.session_key(token),
        name,
        auth.new_token(),
        now,
        now + s.session_ttl_s * 1000,
    )
    resp = RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
    auth.set_cookie(request, resp, auth.SESSION_COOKIE, token, s.session_ttl_s)
    resp.delete_cookie(auth.CSRF_COOKIE, path="/")
    return resp


async def logout(request: Request) -> Response:
    auth.check_origin(request)
    session = await auth.current_session(request)
    form = await auth.read_form(request)
    if session is None:
        return RedirectResponse("/login", status_code=303)
    if not auth.tokens_equal(form.get("csrf", ""), session["csrf"]):
        raise Rejected(403, "csrf", "CSRF token missing or wrong")
    token = request.cookies.get(auth.SESSION_COOKIE, "")
    await run_in_threadpool(request.app.state.backend.delete_session, auth.session_key(token))
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(auth.SESSION_COOKIE, path="/")
    return resp


# -- pages ----------------------------------------------------------------------------------
async def fleet_page(request: Request) -> Response:
    session = await auth.current_session(request)
    if session is None:
        return _login_redirect(request)
    body = """
<div class="head"><h1>Fleet</h1><span class="live" id="live">live</span></div>
<section class="cards" id="summary" aria-label="Fleet summary"></section>
<section class="card wide">
  <div class="table-wrap"><table id="fleet" class="grid">
    <thead><tr><th>Device</th><th>Status</th><th>Last seen</th><th>Last sync</th>
    <th class="num">Backlog</th><th class="num">Sync lag</th><th class="num">Readings today</th>
    <th class="num">Bytes today</th><th>Link</th><th>Errors (24 h)</th></tr></thead>
    <tbody><tr><td colspan="10" class="muted">Loading…</td></tr></tbody>
  </table></div>
</section>"""
    return _page(request, "Fleet", body, page="fleet", session=session)


async def device_page(request: Request) -> Response:
    session = await auth.current_session(request)
    if session is None:
        return _login_redirect(request)
    name = request.path_params["name"]
    device = await run_in_threadpool(request.app.state.backend.get_device, name)
    if device is None:
        body = f'<section class="card"><h1>No such device</h1><p>{_e(name)} is not registered. <a href="/">Back to the fleet</a></p></section>'
        return _page(request, "Not found", body, page="device", session=session, status=404)
    ranges = "".join(
        f'<button type="button" data-range="{r}"{" aria-pressed=true" if r == "15m" else ""}>{r}</button>'
        for r in RANGES_MS
    )
    body = f"""
<div class="head"><h1><a href="/" class="crumb">Fleet</a> / <span id="device-name">{_e(name)}</span></h1>
<span class="badge" id="device-status">…</span><span class="live" id="live">live</span></div>
<section class="cards" id="device-summary" aria-label="Sync status"></section>
<section class="card wide">
  <div class="toolbar">
    <label class="select">Series <select id="series"></select></label>
    <div class="ranges" role="group" aria-label="Time range">{ranges}</div>
    <button type="button" id="reset-zoom" hidden>Reset zoom</button>
  </div>
  <div id="chart" class="chart" data-points="0" data-readings="0" data-nulls="0"></div>
  <p class="muted small" id="chart-note">Drag across the chart to zoom; empty buckets (no readings received) show as gaps.</p>
</section>
<div class="split">
<section class="card"><h2>Dead letters</h2><div class="table-wrap"><table class="grid" id="dl"><tbody></tbody></table></div></section>
<section class="card"><h2>Rejected requests</h2><div class="table-wrap"><table class="grid" id="rej"><tbody></tbody></table></div></section>
</div>"""
    return _page(request, name, body, page="device", session=session, data={"device": name})


async def logs_page(request: Request) -> Response:
    session = await auth.current_session(request)
    if session is None:
        return _login_redirect(request)
    device = request.query_params.get("device", "")
    body = f"""
<div class="head"><h1>Logs</h1><span class="live" id="live">live</span></div>
<form class="toolbar" id="log-filter" role="search">
  <label class="select">Device <input name="device" id="log-device" value="{_e(device)}" placeholder="all devices"></label>
</form>
<section class="card wide"><h2>Dead letters <small class="muted">reported by devices (metadata only)</small></h2>
  <div class="table-wrap"><table class="grid" id="dl"><tbody></tbody></table></div></section>
<section class="card wide"><h2>Rejected requests <small class="muted">refused uploads, newest first</small></h2>
  <div class="table-wrap"><table class="grid" id="rej"><tbody></tbody></table></div></section>"""
    return _page(request, "Logs", body, page="logs", session=session)


# -- JSON for the page script -------------------------------------------------------------------
def fleet_view(
    devices: list[dict[str, Any]], activity: dict[str, dict[str, Any]], now: int, offline_ms: int
) -> dict[str, Any]:
    rows = []
    for d in devices:
        rep = d.get("reported") or {}
        act = activity.get(d["name"], {})
        seen = d.get("last_seen_ms")
        newest = act.get("newest_ts")
        rows.append(
            {
                "name": d["name"],
                "online": seen is not None and now - seen <= offline_ms,
                "last_seen_ms": seen,
                "last_sync_ms": d.get("last_sync_ms"),
                "backlog_readings": rep.get("backlog_readings"),
                "backlog_batches": rep.get("backlog_batches"),
                "oldest_unsynced_ms": rep.get("oldest_unsynced_ms"),
                "dead_letters": rep.get("dead_letters"),
                "newest_ts": newest,
                # How far the cloud's copy trails the present: newest reading received.
                "lag_ms": max(0, now - newest) if newest is not None else None,
                "today": d.get("today") or {},
                "link": d.get("link"),
                "rejections_24h": act.get("rejections", 0),
                "last_error": d.get("last_error"),
                "last_error_ms": d.get("last_error_ms"),
            }
        )
    online = sum(r["online"] for r in rows)
    return {
        "now": now,
        "offline_after_ms": offline_ms,
        "totals": {
            "devices": len(rows),
            "online": online,
            "offline": len(rows) - online,
            "backlog_readings": sum(r["backlog_readings"] or 0 for r in rows if r["online"]),
            "readings_today": sum(r["today"].get("readings", 0) for r in rows),
            "bytes_today": sum(r["today"].get("bytes", 0) for r in rows),
            "rejections_24h": sum(r["rejections_24h"] for r in rows),
        },
        "devices": rows,
    }


@operator_endpoint
async def fleet_json(request: Request) -> Response:
    backend = request.app.state.backend
    s: DashboardSettings = request.app.state.dashboard
    now = now_ms()

    def load() -> dict[str, Any]:
        one = request.query_params.get("device")
        if one:
            d = backend.get_device(one)
            if d is None:
                raise Rejected(404, "not_found", f"no device named {one[:64]!r}")
            devices = [d]
        else:
            devices = backend.list_devices()
        return fleet_view(
            devices, backend.device_activity(now - _D), now, int(s.offline_after_s * 1000)
        )

    return JSONResponse(await run_in_threadpool(load))


def pick_step(span_ms: int) -> int:
    want = span_ms / MAX_POINTS
    return next((s for s in STEPS_MS if s >= want), math.ceil(want / _D) * _D)


def chart_window(since: int, until: int) -> tuple[int, int, int]:
    """Aligned ``(since, until, step)`` covering ``[since, until)`` in at most about
    :data:`MAX_POINTS` buckets; whole-hour steps align to hours so the rollup serves them."""
    step = pick_step(max(1, until - since))
    if step >= ROLLUP_MS and step % ROLLUP_MS:
        step = -(-step // ROLLUP_MS) * ROLLUP_MS
    lo = since // step * step
    hi = -(-until // step) * step
    return lo, max(hi, lo + step), step


def _int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise Rejected(400, "bad_query", f"{name} must be an integer") from None


@operator_endpoint
async def series_json(request: Request) -> Response:
    p = request.query_params
    device = p.get("device")
    metric = p.get("metric")
    if not device or not metric:
        raise Rejected(400, "bad_query", "device and metric are required")
    now = now_ms()
    since, until = _int(request, "since"), _int(request, "until")
    if since is None or until is None:
        span = RANGES_MS.get(p.get("range", "1h"))
        if span is None:
            raise Rejected(400, "bad_query", f"range must be one of {', '.join(RANGES_MS)}")
        until = now + 1
        since = until - span
    if since >= until:
        raise Rejected(400, "bad_query", "since must be before until")
    since, until, step = chart_window(since, until)
    nbuckets = (until - since) // step
    q = ReadingsQuery(
        device=device,
        metric=metric,
        source=p.get("source") or None,
        since=since,
        until=until,
        step=step,
        limit=min(10_000, nbuckets * 8),
    )
    try:
        result = await run_in_threadpool(request.app.state.backend.readings, q)
    except UnknownDevice:
        raise Rejected(404, "not_found", f"no device named {device[:64]!r}") from None
    # Several tag sets of one (source, metric) fold into one line: count-weighted mean.
    count: list[int] = [0] * nbuckets
    total: list[float] = [0.0] * nbuckets
    lo: list[float | None] = [None] * nbuckets
    hi: list[float | None] = [None] * nbuckets
    for r in result["rows"]:
        i = (r["ts"] - since) // step
        if not 0 <= i < nbuckets:
            continue
        count[i] += r["count"]
        total[i] += r["avg"] * r["count"]
        lo[i] = r["min"] if lo[i] is None else min(lo[i], r["min"])
        hi[i] = r["max"] if hi[i] is None else max(hi[i], r["max"])
    avg = [total[i] / count[i] if count[i] else None for i in range(nbuckets)]
    return JSONResponse(
        {
            "device": device,
            "metric": metric,
            "source": q.source,
            "since": since,
            "until": until,
            "step": step,
            "truncated": result["truncated"],
            "ts": [since + i * step for i in range(nbuckets)],
            "avg": avg,
            "min": lo,
            "max": hi,
            "count": count,
        }
    )


@operator_endpoint
async def series_list_json(request: Request) -> Response:
    name = request.query_params.get("device", "")
    try:
        metrics = await run_in_threadpool(request.app.state.backend.device_metrics, name)
    except UnknownDevice:
        raise Rejected(404, "not_found", f"no device named {name[:64]!r}") from None
    return JSONResponse({"device": name, "metrics": metrics})


@operator_endpoint
async def logs_json(request: Request) -> Response:
    backend = request.app.state.backend
    device = request.query_params.get("device") or None
    limit = min(max(_int(request, "limit") or 100, 1), 500)

    def load() -> dict[str, Any]:
        return {
            "dead_letters": backend.dead_letters(device, limit, None),
            "rejections": backend.rejections(device, limit, None),
        }

    return JSONResponse(await run_in_threadpool(load))


def dashboard_routes() -> list[BaseRoute]:
    return [
        Route("/", fleet_page, methods=["GET"]),
        Route("/devices/{name}", device_page, methods=["GET"]),
        Route("/logs", logs_page, methods=["GET"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/ui/api/fleet", fleet_json, methods=["GET"]),
        Route("/ui/api/series", series_json, methods=["GET"]),
        Route("/ui/api/metrics", series_list_json, methods=["GET"]),
        Route("/ui/api/logs", logs_json, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ]


def install(app: Any, settings: DashboardSettings | None, api_token: str | None) -> None:
    """Attach the dashboard's state to a receiver app (called by ``create_app``)."""
    s = settings or DashboardSettings.from_env()
    app.state.dashboard = s
    app.state.login_limiter = auth.LoginLimiter(s.login_max_failures, s.login_window_s)
    app.state.authorize_operator = auth.operator_authorizer(api_token)
