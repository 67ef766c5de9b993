"""Badges: the states of a device an operator must act on, from its health snapshots
(docs/health.md).  Pure functions over snapshots (``{"seq", "ts", "values"}``); the
thresholds are receiver settings (:class:`cloud.DashboardSettings`, ``badge_*``).

Each badge names its evidence -- the snapshot (``seq``, ``ts``) and the ``key`` in it -- so
the dashboard links a badge to the health panel at that snapshot.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BADGE_KINDS",
    "Thresholds",
    "badges",
    "counter_increase",
    "raise_badges",
    "usual_interval_ms",
]

#: Every badge, in the order they are raised.
BADGE_KINDS = ("store_full", "breaker_open", "session_lost", "clock_skew", "silent")


@dataclass(frozen=True)
class Thresholds:
    """When a badge is raised (the runtime form of the ``badge_*`` settings)."""

    store_fill: float = 0.8  #: used / quota above this: ``store_full``
    clock_skew_ms: int = 30_000  #: |skew| above this: ``clock_skew``
    silent_factor: float = 3.0  #: silent for this many usual intervals ...
    silent_min_ms: int = 120_000  #: ... and at least this long: ``silent``
    window_ms: int = 3_600_000  #: the fleet's look-back (``session_lost``)

    @classmethod
    def from_settings(cls, s: Any) -> Thresholds:
        return cls(
            store_fill=s.badge_store_fill,
            clock_skew_ms=int(s.badge_clock_skew_s * 1000),
            silent_factor=s.badge_silent_factor,
            silent_min_ms=int(s.badge_silent_min_s * 1000),
            window_ms=int(s.badge_window_s * 1000),
        )

    def silent_after_ms(self, usual_ms: float | None) -> int:
        """How long without news is silence for a device reporting every ``usual_ms``."""
        return int(max(self.silent_min_ms, self.silent_factor * (usual_ms or 0)))

    def as_dict(self) -> dict[str, float]:
        return {
            "store_fill": self.store_fill,
            "clock_skew_ms": self.clock_skew_ms,
            "silent_factor": self.silent_factor,
            "silent_min_ms": self.silent_min_ms,
            "window_ms": self.window_ms,
        }


def usual_interval_ms(stamps: list[int]) -> float | None:
    """The median spacing of a device's snapshots (its reporting interval); None for fewer
    than two."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b > a]
    return statistics.median(gaps) if gaps else None


def counter_increase(prev: Any, cur: Any) -> int | None:
    """How much a counter grew from ``prev`` to ``cur`` (None: ``cur`` is no count); one
    that went down was reset (the process restarted) and grew by ``cur`` since, one not
    there before was 0."""
    if not isinstance(cur, int):
        return None
    if not isinstance(prev, int):
        prev = 0
    return cur - prev if cur >= prev else cur


def raise_badges(
    newest: dict[str, Any] | None,
    first: dict[str, Any] | None,
    *,
    now: int,
    thresholds: Thresholds,
    usual_ms: float | None = None,
    last_contact_ms: int | None = None,
) -> list[dict[str, Any]]:
    """The badges a device raises: ``newest`` its newest snapshot, ``first`` the oldest of
    the look-back (``session_lost`` compares the two), ``usual_ms`` its usual reporting
    interval, ``last_contact_ms`` its last upload as the receiver saw it (receiver clock;
    else the newest snapshot's time counts)."""
    out: list[dict[str, Any]] = []
    if newest is None:
        return out
    v = newest["values"]
    quota = v.get("store_quota_b") or 0
    used = v.get("store_used_b") or 0
    if isinstance(quota, int) and isinstance(used, int) and quota > 0:
        fill = used / quota
        if fill > thresholds.store_fill:
            out.append(
                _badge("store_full", f"store {fill:.0%} of its quota", newest, "store_used_b")
            )
    for k, x in sorted(v.items()):
        if k.startswith("breaker_open:") and x:
            out.append(_badge("breaker_open", f"stage {k[13:]} breaker open", newest, k))
    if first is not None and first is not newest:
        lost = counter_increase(first["values"].get("sessions_lost"), v.get("sessions_lost"))
        if lost:
            text = f"MQTT session lost ({lost}x)" if lost > 1 else "MQTT session lost"
            out.append(_badge("session_lost", text, newest, "sessions_lost"))
    for key in ("clock_skew_ms", "receiver_skew_ms"):
        skew = v.get(key)
        if isinstance(skew, int) and abs(skew) > thresholds.clock_skew_ms:
            out.append(_badge("clock_skew", f"clock off by {skew / 1000:+.0f} s", newest, key))
            break
    contact = max(newest["ts"], last_contact_ms or 0)
    quiet = now - contact
    if quiet > thresholds.silent_after_ms(usual_ms):
        usual = f", usually every {usual_ms / 1000:.0f} s" if usual_ms else ""
        out.append(_badge("silent", f"silent for {quiet // 60_000} min{usual}", newest, "ts"))
    return out


def badges(
    snapshots: list[dict[str, Any]],
    status: dict[str, Any] | None,
    now: int,
    thresholds: Thresholds | None = None,
    last_contact_ms: int | None = None,
) -> list[dict[str, Any]]:
    """The badges of a run of snapshots (oldest first): its newest, compared with its first,
    its usual interval the median spacing.  ``status`` (the device's reported status) adds
    a ``clock_skew_ms`` the snapshots lack."""
    if not snapshots:
        return []
    newest = snapshots[-1]
    if status and "clock_skew_ms" in status and "clock_skew_ms" not in newest["values"]:
        newest = {
            **newest,
            "values": {**newest["values"], "clock_skew_ms": status["clock_skew_ms"]},
        }
    return raise_badges(
        newest,
        snapshots[0],
        now=now,
        thresholds=thresholds or Thresholds(),
        usual_ms=usual_interval_ms([s["ts"] for s in snapshots[-50:]]),
        last_contact_ms=last_contact_ms,
    )


def _badge(kind: str, text: str, snap: dict[str, Any], key: str) -> dict[str, Any]:
    return {"badge": kind, "text": text, "seq": snap["seq"], "ts": snap["ts"], "key": key}
