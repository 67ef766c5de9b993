"""The JSON the dashboard's page script polls: the fleet overview, one device's chart data
(always bucketed on the server), its series and the logs.

Charts: a range is cut into at most :data:`MAX_POINTS` buckets of a "nice" width, the
backend aggregates each bucket (avg/min/max/count, from the hourly rollup for whole-hour
buckets), and empty buckets are sent as ``null`` so a device's offline period shows as a
gap -- which fills once its backlog arrives.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core._clock import now_ms

from ._auth import operator_endpoint
from ._backend import ROLLUP_MS, ReadingsQuery
from ._badges import Thresholds, badges, raise_badges
from ._errors import Rejected, UnknownDevice
from ._health_view import health_view
from ._queries import MAX_TS_MS
from ._settings import DashboardSettings

__all__ = [
    "MAX_POINTS",
    "RANGES_MS",
    "chart_window",
    "fleet_json",
    "fleet_view",
    "health_json",
    "logs_json",
    "pick_step",
    "series_json",
    "series_list_json",
]

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


def fleet_view(
    devices: list[dict[str, Any]],
    activity: dict[str, dict[str, Any]],
    now: int,
    offline_ms: int,
    health: dict[str, dict[str, Any]] | None = None,
    thresholds: Thresholds | None = None,
) -> dict[str, Any]:
    """The fleet table; with ``health`` (:meth:`Health.health_overview`) each device's
    badges too."""
    th = thresholds or Thresholds()
    rows = []
    for d in devices:
        rep = d.get("reported") or {}
        act = activity.get(d["name"], {})
        seen = d.get("last_seen_ms")
        newest = act.get("newest_ts")
        h = (health or {}).get(d["name"])
        found = []
        if h is not None:
            usual = h["span_ms"] / (h["count"] - 1) if h["count"] > 1 else None
            found = raise_badges(
                h["newest"], h["first"], now=now, thresholds=th, usual_ms=usual,
                last_contact_ms=seen,
            )  # fmt: skip
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
                "badges": found,
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
            "attention": sum(bool(r["badges"]) for r in rows),
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
                raise UnknownDevice(one)
            devices = [d]
        else:
            devices = backend.list_devices()
        th = Thresholds.from_settings(s)
        view = fleet_view(
            devices,
            backend.device_activity(now - _D),
            now,
            int(s.offline_after_s * 1000),
            backend.health_overview(now - th.window_ms),
            th,
        )
        bundles = {b["device"]: b for b in backend.bundle_states()}
        for row in view["devices"]:
            b = bundles.get(row["name"]) or {}
            row["bundle"] = {
                k: b.get(k)
                for k in ("active_version", "desired_version", "in_sync", "status", "chain")
            }
        return view

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


def _int(request: Request, name: str, lo: int = 0, hi: int = MAX_TS_MS) -> int | None:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return None
    try:
        if len(raw) > 24:
            raise ValueError
        value = int(raw)
    except ValueError:
        raise Rejected(400, "bad_query", f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise Rejected(400, "bad_query", f"{name} must be between {lo} and {hi}")
    return value


def _mean(parts: list[tuple[float, int]], count: int) -> float | None:
    """Count-weighted mean of bucket means, summed as weights (no product can overflow)."""
    if not count:
        return None
    if len(parts) == 1:
        return parts[0][0]
    mean = math.fsum(avg * (n / count) for avg, n in parts)
    return mean if math.isfinite(mean) else None


def _chart_range(request: Request) -> tuple[int, int, int]:
    """A chart's ``(since, until, step)`` from ``since`` and ``until`` or a named ``range``
    (ending now), bucketed by :func:`chart_window`."""
    since, until = _int(request, "since"), _int(request, "until")
    if since is None or until is None:
        span = RANGES_MS.get(request.query_params.get("range", "1h"))
        if span is None:
            raise Rejected(400, "bad_query", f"range must be one of {', '.join(RANGES_MS)}")
        until = now_ms() + 1
        since = max(0, until - span)
    if since >= until:
        raise Rejected(400, "bad_query", "since must be before until")
    return chart_window(since, until)


@operator_endpoint
async def series_json(request: Request) -> Response:
    p = request.query_params
    device = p.get("device")
    metric = p.get("metric")
    if not device or not metric:
        raise Rejected(400, "bad_query", "device and metric are required")
    since, until, step = _chart_range(request)
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
    result = await run_in_threadpool(request.app.state.backend.readings, q)
    # Several tag sets of one (source, metric) fold into one line: count-weighted mean.
    count: list[int] = [0] * nbuckets
    parts: list[list[tuple[float, int]]] = [[] for _ in range(nbuckets)]
    lo: list[float | None] = [None] * nbuckets
    hi: list[float | None] = [None] * nbuckets
    for r in result["rows"]:
        i = (r["ts"] - since) // step
        if not 0 <= i < nbuckets:
            continue
        if r["avg"] is None:  # a bucket whose stored sum is unusable shows as a gap
            continue
        count[i] += r["count"]
        parts[i].append((r["avg"], r["count"]))
        lo[i] = r["min"] if lo[i] is None else min(lo[i], r["min"])
        hi[i] = r["max"] if hi[i] is None else max(hi[i], r["max"])
    avg = [_mean(parts[i], count[i]) for i in range(nbuckets)]
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
    metrics = await run_in_threadpool(request.app.state.backend.device_metrics, name)
    return JSONResponse({"device": name, "metrics": metrics})


@operator_endpoint
async def logs_json(request: Request) -> Response:
    backend = request.app.state.backend
    device = request.query_params.get("device") or None
    limit = min(max(_int(request, "limit", 0, 2**31) or 100, 1), 500)

    def load() -> dict[str, Any]:
        return {
            "dead_letters": backend.dead_letters(device, limit, None),
            "rejections": backend.rejections(device, limit, None),
        }

    return JSONResponse(await run_in_threadpool(load))


@operator_endpoint
async def health_json(request: Request) -> Response:
    """The health panel of one device over a chart range (:func:`health_view`), with the
    badges its newest snapshots raise and the thresholds they were judged by."""
    backend = request.app.state.backend
    name = request.query_params.get("device")
    if not name:
        raise Rejected(400, "bad_query", "device is required")
    since, until, step = _chart_range(request)
    th = Thresholds.from_settings(request.app.state.dashboard)

    def load() -> dict[str, Any]:
        device = backend.get_device(name)
        if device is None:
            raise UnknownDevice(name)
        now = now_ms()
        baseline, buckets = backend.health_buckets(name, since, until, step)
        view = health_view(buckets, baseline, since, until, step)
        # the look-back's snapshots, else (silent for longer) the newest one there is
        recent = backend.device_health(name, now - th.window_ms, None, 500)
        recent = recent or backend.device_health(name, None, None, 1)
        found = badges(recent, device.get("reported"), now, th, device.get("last_seen_ms"))
        return {"device": name, "now": now, **view, "badges": found, "thresholds": th.as_dict()}

    return JSONResponse(await run_in_threadpool(load))
