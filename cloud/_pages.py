"""The dashboard's HTML: the page shell (security headers, the page script and style), and
the fleet, device and logs pages.  The pages are shells the page script
(``cloud/static/dashboard.js``) fills from the JSON of :mod:`cloud._ui_api`; each needs an
operator session, else it redirects to the login page."""

from __future__ import annotations

import hashlib
import html
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from . import _auth as auth
from ._settings import DashboardSettings
from ._ui_api import RANGES_MS

__all__ = [
    "STATIC",
    "device_page",
    "fleet_page",
    "login_redirect",
    "logs_page",
    "page",
    "safe_next",
]

STATIC = Path(__file__).with_name("static")


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


def page(
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
        links = [("fleet", "/", "Fleet"), ("rollouts", "/rollouts", "Rollouts")]
        links.append(("logs", "/logs", "Logs"))
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


login_redirect = _login_redirect


def safe_next(value: str | None) -> str:
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


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
    <th class="num">Bytes today</th><th>Link</th><th>Errors (24 h)</th><th>Bundle</th></tr></thead>
    <tbody><tr><td colspan="11" class="muted">Loading…</td></tr></tbody>
  </table></div>
</section>
<section class="card wide" id="alerts-card"><h2>Alerts <small class="muted" id="alerts-note"></small></h2>
  <div class="table-wrap"><table id="alerts" class="grid"><tbody><tr><td class="muted">Loading…</td></tr></tbody></table></div>
</section>"""
    return page(request, "Fleet", body, page="fleet", session=session)


async def device_page(request: Request) -> Response:
    session = await auth.current_session(request)
    if session is None:
        return _login_redirect(request)
    name = request.path_params["name"]
    device = await run_in_threadpool(request.app.state.backend.get_device, name)
    if device is None:
        body = f'<section class="card"><h1>No such device</h1><p>{_e(name)} is not registered. <a href="/">Back to the fleet</a></p></section>'
        return page(request, "Not found", body, page="device", session=session, status=404)
    ranges = "".join(
        f'<button type="button" data-range="{r}"{" aria-pressed=true" if r == "15m" else ""}>{r}</button>'
        for r in RANGES_MS
    )
    body = f"""
<div class="head"><h1><a href="/" class="crumb">Fleet</a> / <span id="device-name">{_e(name)}</span></h1>
<span class="badge" id="device-status">…</span><span id="device-badges" class="badges"></span><span class="live" id="live">live</span></div>
<section class="cards" id="device-summary" aria-label="Sync status"></section>
<section class="card wide">
  <div class="toolbar">
    <label class="select">Series <select id="series"></select></label>
    <div class="ranges" role="group" aria-label="Time range (readings and health)">{ranges}</div>
    <button type="button" id="reset-zoom" hidden>Reset zoom</button>
  </div>
  <div id="chart" class="chart" data-points="0" data-readings="0" data-nulls="0"></div>
  <p class="muted small" id="chart-note">Drag across the chart to zoom; empty buckets (no readings received) show as gaps.</p>
</section>
<section class="card wide evidence" id="evidence" hidden aria-label="Badge evidence"></section>
<section class="card wide" id="health" aria-label="Health" data-snapshots="0" data-updated="0">
  <h2>Health <small class="muted" id="health-note">health snapshots the device reported, over the time range above</small></h2>
  <div class="cards" id="health-summary"></div>
  <div class="health-charts" id="health-charts"></div>
  <div class="split3">
    <div><h3>Traps</h3><div class="table-wrap"><table class="grid" id="health-traps"><tbody></tbody></table></div></div>
    <div><h3>Drops</h3><div class="table-wrap"><table class="grid" id="health-drops"><tbody></tbody></table></div></div>
    <div><h3>Dead letters</h3><div class="table-wrap"><table class="grid" id="health-dead_letters"><tbody></tbody></table></div></div>
  </div>
</section>
{_log_view(name)}
<div class="split">
<section class="card"><h2>Dead letters</h2><div class="table-wrap"><table class="grid" id="dl"><tbody></tbody></table></div></section>
<section class="card"><h2>Rejected requests</h2><div class="table-wrap"><table class="grid" id="rej"><tbody></tbody></table></div></section>
</div>"""
    return page(request, name, body, page="device", session=session, data={"device": name})


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
{_log_view(None)}
<section class="card wide"><h2>Dead letters <small class="muted">reported by devices (metadata only)</small></h2>
  <div class="table-wrap"><table class="grid" id="dl"><tbody></tbody></table></div></section>
<section class="card wide"><h2>Rejected requests <small class="muted">refused uploads, newest first</small></h2>
  <div class="table-wrap"><table class="grid" id="rej"><tbody></tbody></table></div></section>"""
    return page(request, "Logs", body, page="logs", session=session)


#: The log view's time ranges (``all``: as far back as the receiver keeps).
LOG_RANGES = ("15m", "1h", "6h", "24h", "7d", "30d", "all")


def _log_view(device: str | None) -> str:
    """The device log view: level, text and time-range filters over the records the
    device(s) logged (``/v1/logs``), newest first, a page at a time.  Filled by the page
    script; ``?level=&q=&since=&until=`` of the page preset it (a badge's evidence)."""
    levels = "".join(
        f'<option value="{v}">{label}</option>'
        for v, label in (
            ("", "warning and above"),
            ("ERROR", "error and above"),
            ("CRITICAL", "critical"),
        )
    )
    ranges = "".join(
        f'<option value="{r}"{" selected" if r == "24h" else ""}>{"all kept" if r == "all" else "last " + r}</option>'
        for r in LOG_RANGES
    )
    scope = "this device" if device else "every device"
    return f"""<section class="card wide" id="device-log" aria-label="Device logs" data-rows="0" data-updated="0">
  <h2>Device logs <small class="muted">warnings and errors {scope} logged, newest first; repeats are one record with a count</small></h2>
  <form class="toolbar" id="devlog-filter" role="search">
    <label class="select">Level <select name="level" id="devlog-level">{levels}</select></label>
    <label class="select">Search <input type="search" name="q" id="devlog-q" maxlength="200" placeholder="text in the message"></label>
    <label class="select">Time <select name="range" id="devlog-range">{ranges}</select></label>
    <span class="muted small" id="devlog-window" hidden></span>
    <button type="button" id="devlog-clear-window" class="plain" hidden>Show the latest</button>
  </form>
  <div class="table-wrap"><table class="grid" id="devlog"><tbody><tr><td class="muted">Loading…</td></tr></tbody></table></div>
  <p><button type="button" id="devlog-more" class="plain" hidden>Older records</button></p>
</section>"""
