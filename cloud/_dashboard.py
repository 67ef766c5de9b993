"""The operator dashboard: server-rendered page shells plus small JSON endpoints that the
page script (``cloud/static/dashboard.js``, built from ``web/``) polls for live updates.

Pages: ``/`` (fleet overview), ``/devices/{name}`` (charts of one device), ``/logs``
(dead letters and rejected requests), ``/login``.  JSON: ``/ui/api/fleet``,
``/ui/api/series``, ``/ui/api/logs``, ``/ui/api/health`` (the health panel; the log view
reads the read API's ``/v1/logs``).  Everything but the login page needs an operator
session (see :mod:`cloud._auth`); a device signature opens none of it.

The pages and their shell are in :mod:`cloud._pages`, sign-in in :mod:`cloud._login`, the
JSON (and how charts are bucketed) in :mod:`cloud._ui_api`; this module routes them and
installs the dashboard's state on the app.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from . import _auth as auth
from ._login import login_page, login_submit, logout
from ._pages import STATIC, device_page, fleet_page, logs_page
from ._rollout_api import page_routes as rollout_pages
from ._settings import DashboardSettings
from ._ui_api import fleet_json, health_json, logs_json, series_json, series_list_json

__all__ = ["dashboard_routes", "install"]


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
        Route("/ui/api/health", health_json, methods=["GET"]),
        *rollout_pages(),
        Mount("/static", app=StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ]


def install(app: Any, settings: DashboardSettings | None, api_token: str | None) -> None:
    """Attach the dashboard's state to a receiver app (called by ``create_app``)."""
    s = settings or DashboardSettings.from_env()
    app.state.dashboard = s
    app.state.login_limiter = auth.LoginLimiter(s.login_max_failures, s.login_window_s)
    app.state.authorize_operator = auth.operator_authorizer(api_token)
