"""The health panel's data (docs/dashboard.md): a device's health snapshots over a chart
range, as chart series on the same buckets as the readings charts.

A range is cut like a readings chart (:func:`cloud._ui_api.chart_window`); the backend gives
the snapshots of the range (every one up to :data:`cloud._health.EXACT_MAX`, else the last
of each bucket) and the last one before it, the baseline.  Gauges (RSS, store, skew) are a
bucket's last value; counters (CPU time, link bytes, drops, dead letters, traps) become what
they grew by in the bucket, snapshot to snapshot -- a counter that went down was reset by a
restart and grew by its new value -- and CPU a rate (% of one core).  Empty buckets are
``None`` so a device's silence shows as a gap, as on the readings chart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._badges import counter_increase

__all__ = ["COUNTER_GROUPS", "MAX_LINES", "health_view"]

#: Most lines one chart draws; the smaller rest of a group is summed as "other".
MAX_LINES = 8

#: Counter charts: (id, title, key prefix, what the parts of a key name).
COUNTER_GROUPS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("link", "Link bytes sent", "link_bytes:", ("link",)),
    ("drops", "Readings dropped", "drops:", ("stage", "reason")),
    ("dead_letters", "Dead letters", "dead_letters:", ("stage", "reason")),
    ("traps", "Traps", "traps:", ("stage", "code")),
)


def health_view(
    buckets: list[dict[str, Any]],
    baseline: dict[str, Any] | None,
    since: int,
    until: int,
    step: int,
) -> dict[str, Any]:
    """Chart series over ``[since, until)`` in buckets of ``step`` from ``buckets`` (snapshots
    of the range, oldest first: all, or the last of each bucket) and ``baseline`` (the last
    snapshot before ``since``, or None)."""
    n = max(0, (until - since) // step)
    index = [(s["ts"] - since) // step for s in buckets]
    placed = [(i, s) for i, s in zip(index, buckets, strict=True) if 0 <= i < n]

    def gauge(fn: Callable[[dict[str, Any]], Any]) -> list[Any]:
        out: list[Any] = [None] * n
        for i, s in placed:  # the bucket's last value
            v = fn(s["values"])
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[i] = v
        return out

    # CPU: the rate of cpu_ms over the bucket's snapshots, in % of one core.
    busy, spent = [0] * n, [0] * n
    prev = baseline
    for i, s in placed:
        if prev is not None:
            was = prev["values"].get("cpu_ms")
            dc = counter_increase(was, s["values"].get("cpu_ms"))
            dt = s["ts"] - prev["ts"]
            if isinstance(was, int) and dc is not None and dt > 0:
                busy[i] += dc
                spent[i] += dt
        prev = s
    cpu = [round(100 * b / t, 2) if t else None for b, t in zip(busy, spent, strict=True)]

    charts: list[dict[str, Any]] = [
        _chart("cpu", "CPU", "%", [("cpu_pct", "CPU (% of one core)", cpu)]),
        _chart("rss", "Memory (RSS)", "B", [("rss_kb", "RSS", gauge(_kb("rss_kb")))]),
        _chart(
            "store",
            "Store",
            "B",
            [
                ("store_used_b", "used", gauge(lambda v: v.get("store_used_b"))),
                ("store_quota_b", "quota", gauge(lambda v: v.get("store_quota_b"))),
            ],
        ),
    ]
    totals: dict[str, list[dict[str, Any]]] = {}
    grown = _increases(placed, baseline, n)
    for cid, title, prefix, parts in COUNTER_GROUPS:
        lines, rows = _counters(grown.get(prefix, {}), n, prefix, parts)
        charts.append(_chart(cid, title, "B" if cid == "link" else "count", lines))
        totals[cid] = rows
    charts.append(
        _chart(
            "skew",
            "Clock skew",
            "s",
            [
                ("clock_skew_ms", "device's estimate", gauge(_secs("clock_skew_ms"))),
                ("receiver_skew_ms", "receiver's measure", gauge(_secs("receiver_skew_ms"))),
            ],
        )
    )
    chain_changes = []
    last_chain = baseline["values"].get("chain") if baseline else None
    for _, s in placed:
        c = s["values"].get("chain")
        if isinstance(c, str) and c != last_chain:
            chain_changes.append({"ts": s["ts"], "seq": s["seq"], "chain": c})
            last_chain = c
    newest = placed[-1][1] if placed else None
    filled = {i for i, _ in placed}
    return {
        "since": since,
        "until": until,
        "step": step,
        "ts": [since + i * step for i in range(n)],
        "snapshots": len(placed),
        "present": [int(i in filled) for i in range(n)],
        "charts": charts,
        "totals": totals,
        "latest": newest,
        "chain": {
            "current": newest["values"].get("chain") if newest else None,
            "changes": chain_changes,
        },
    }


def _kb(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda v: v[key] * 1024 if isinstance(v.get(key), int) else None


def _secs(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda v: v[key] / 1000 if isinstance(v.get(key), int) else None


def _chart(cid: str, title: str, unit: str, lines: list[tuple[str, str, list[Any]]]) -> dict:
    return {
        "id": cid,
        "title": title,
        "unit": unit,
        "series": [{"key": k, "label": label, "values": vals} for k, label, vals in lines],
    }


_GROUP_OF = {prefix[:-1]: prefix for _, _, prefix, _ in COUNTER_GROUPS}


def _increases(
    placed: list[tuple[int, dict[str, Any]]], baseline: dict[str, Any] | None, n: int
) -> dict[str, dict[str, list[Any]]]:
    """Per counter group (its key prefix), per key: what it grew by in each bucket (0 in a
    bucket with a snapshot but no increase, None in one without).  One pass over the
    snapshots."""
    grown: dict[str, dict[str, list[Any]]] = {}
    last: dict[str, Any] = dict(baseline["values"]) if baseline else {}
    for j, (i, s) in enumerate(placed):
        counts = baseline is not None or j > 0  # the first snapshot ever is only a start
        for k, v in s["values"].items():
            group = _GROUP_OF.get(k.partition(":")[0]) if ":" in k else None
            if group is None:
                continue
            inc = counter_increase(last.get(k), v)
            last[k] = v
            if inc is not None and counts:
                col = grown.setdefault(group, {}).get(k)
                if col is None:
                    col = grown[group][k] = [None] * n
                col[i] = (col[i] or 0) + inc
    for keys in grown.values():
        for col in keys.values():
            for i, _ in placed:
                if col[i] is None:
                    col[i] = 0
    return grown


def _counters(
    per_key: dict[str, list[Any]], n: int, prefix: str, parts: tuple[str, ...]
) -> tuple[list[tuple[str, str, list[Any]]], list[dict[str, Any]]]:
    """A counter group's lines (the :data:`MAX_LINES` that grew most, the rest summed) and
    its totals in the range, most first."""
    totals = {k: sum(x for x in col if x) for k, col in per_key.items()}
    order = sorted(per_key, key=lambda k: (-totals[k], k))
    lines = [(k, k[len(prefix) :], per_key[k]) for k in order[:MAX_LINES]]
    if len(order) > MAX_LINES:
        rest = order[MAX_LINES:]
        other = [
            None
            if all(per_key[k][i] is None for k in rest)
            else sum(per_key[k][i] or 0 for k in rest)
            for i in range(n)
        ]
        lines.append((prefix + "*", f"{len(rest)} others", other))
    rows = []
    for k in order:
        names = k[len(prefix) :].split(":", len(parts) - 1)
        row: dict[str, Any] = {"key": k, "n": totals[k]}
        row.update(zip(parts, names + [""] * (len(parts) - len(names)), strict=True))
        rows.append(row)
    return lines, rows
