"""The receiver's ASGI app (Starlette): the upload endpoint, the read API, the dashboard.

``create_app(settings)`` returns a Starlette app with the storage backend on
``app.state.backend`` and the settings on ``app.state.settings``.  Pages can be mounted next
to the API with ``create_app(settings, extra_routes=[...])``; the read endpoints call
:func:`require_operator`, which defers to ``app.state.authorize_operator`` (an operator
session of the dashboard, see :mod:`cloud._auth`, or the settings' API bearer token) -- a
device signature never opens them.

The endpoints live by role: :mod:`cloud._upload` (``POST /v1/batches``),
:mod:`cloud._read_api` (the read API, the probe, the OpenAPI document) and
:mod:`cloud._dashboard` (the operator pages).  Domain errors of the backend become HTTP
answers in one place, :func:`cloud._http_errors.rejection_for`.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core._clock import SYSTEM_CLOCK, Clock

from . import _bundle_api as bundle
from . import _health_api as health
from . import _read_api as read
from . import _rollout_api as rollout
from ._admission import DeviceRate, UploadGate
from ._alert_rules import AlertRules, load_alert_rules
from ._alerts import build_engine
from ._alerts_api import list_alerts
from ._auth import PasswordChecker, operator_endpoint, require_operator
from ._backend import Backend
from ._clock_flag import ClockFlags
from ._dashboard import dashboard_routes, install
from ._http_errors import RefuseNul, SecurityHeaders, exception_handlers, rejection_for
from ._open import open_backend
from ._secrets import MasterKey, no_master_key
from ._settings import DashboardSettings, Settings
from ._upload import post_batches

__all__ = ["api_routes", "create_app", "rejection_for", "require_operator"]


def api_routes() -> list[BaseRoute]:
    return [
        Route("/v1/ping", read.ping, methods=["GET"]),
        Route("/v1/batches", post_batches, methods=["POST"]),
        Route("/v1/bundle", bundle.check_in, methods=["POST"]),
        Route("/v1/modules/{sha256}", bundle.get_module, methods=["GET"]),
        Route("/v1/devices", read.list_devices, methods=["GET"]),
        Route("/v1/devices/{name}", read.get_device, methods=["GET"]),
        Route("/v1/devices/{name}/metrics", read.device_metrics, methods=["GET"]),
        Route("/v1/devices/{name}/health", health.device_health, methods=["GET"]),
        Route("/v1/devices/{name}/logs", health.device_logs, methods=["GET"]),
        Route("/v1/devices/{name}/bundle", bundle.device_bundle, methods=["GET"]),
        Route("/v1/bundles", bundle.list_bundles, methods=["GET"]),
        Route("/v1/logs", health.fleet_logs, methods=["GET"]),
        Route("/v1/readings", read.readings, methods=["GET"]),
        Route("/v1/rejections", read.rejections, methods=["GET"]),
        Route("/v1/dead-letters", read.dead_letters, methods=["GET"]),
        Route("/v1/receiver", receiver_status, methods=["GET"]),
        Route("/v1/alerts", list_alerts, methods=["GET"]),
        *rollout.routes(),
        Route("/openapi.json", read.openapi, methods=["GET"]),
    ]


@operator_endpoint
async def receiver_status(request: Request) -> Response:
    """The receiver's admission counters: uploads in progress, refusals of requests that did
    not prove their origin (counted here, never logged per request), password checks.
    ---
    summary: Receiver admission counters
    operationId: receiverStatus
    tags: [read]
    security: [{operatorBearer: []}]
    responses:
      "200":
        description: Counters since the receiver started.
        content:
          application/json:
            schema:
              type: object
              properties:
                uploads: {type: object}
                logins: {type: object}
                clock:
                  type: object
                  description: Uploads and readings flagged CLOCK_SKEW (docs/health.md).
              required: [uploads, logins, clock]
      "401": {$ref: "#/components/responses/Error"}
    """
    state = request.app.state
    return JSONResponse(
        {
            "uploads": state.upload_gate.snapshot(),
            "logins": state.password_checker.snapshot(),
            "clock": state.clock_flags.snapshot(),
        }
    )


def create_app(
    settings: Settings | None = None,
    *,
    backend: Backend | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    dashboard: DashboardSettings | None = None,
    alert_rules: AlertRules | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Starlette:
    """The receiver app.  Without ``backend`` one is opened from ``settings.db`` with the
    master key from ``settings`` at startup (none configured: :class:`MasterKeyError`) and
    closed at shutdown; a given backend is left open (the caller owns it).

    Alerts: ``alert_rules``, else the file ``settings.alerts_file`` (read now: a bad file
    raises a located :class:`core._errors.ConfigError`).  Alerts and rollouts
    (:mod:`cloud._rollout`) are evaluated by ``clock``'s time, and ``clock``'s monotonic
    time paces the per-device upload rate."""
    settings = settings or Settings.from_env()
    secrets: dict[int, tuple[bytes | None, str | None]] = {}
    if alert_rules is None and settings.alerts_file is not None:
        alert_rules, secrets = load_alert_rules(settings.alerts_file)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owned = app.state.backend is None
        if owned:
            master_key = MasterKey.from_settings(settings)
            if master_key is None:
                raise no_master_key()
            app.state.backend = await run_in_threadpool(
                functools.partial(open_backend, settings.db, master_key=master_key)
            )
        if alert_rules is not None:
            app.state.alerts = build_engine(app.state.backend, alert_rules, secrets, clock=clock)
            await app.state.alerts.start()
        app.state.rollouts = rollout.engine(app.state.backend, settings, clock)
        await app.state.rollouts.start()
        try:
            yield
        finally:
            await app.state.rollouts.stop()
            if app.state.alerts is not None:
                await app.state.alerts.stop()
                app.state.alerts = None
            app.state.password_checker.close()
            if owned:
                app.state.backend.close()
                app.state.backend = None

    app = Starlette(
        routes=[*api_routes(), *dashboard_routes(), *extra_routes],
        lifespan=lifespan,
        exception_handlers=exception_handlers(),  # type: ignore[arg-type]
        middleware=[Middleware(SecurityHeaders), Middleware(RefuseNul)],
    )
    app.state.settings = settings
    app.state.backend = backend
    app.state.alerts = None  # the AlertEngine, while the app runs with alert rules
    app.state.rollouts = None  # the RolloutEngine, while the app runs
    app.state.clock_flags = ClockFlags(settings.clock_flag_s)
    app.state.upload_gate = UploadGate(
        max_inflight=settings.max_inflight_uploads,
        max_per_device=settings.max_inflight_per_device,
        max_unverified=settings.max_unverified_bodies,
        rate=DeviceRate(
            settings.device_uploads_per_s, settings.device_upload_burst, clock=clock.monotonic
        ),
    )
    token = settings.api_token.get_secret_value() if settings.api_token else None
    install(app, dashboard, token)  # operator sessions (or the API token) for the read API
    d = app.state.dashboard
    app.state.password_checker = PasswordChecker(d.login_check_workers, d.login_check_queue)
    return app
