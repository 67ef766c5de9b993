"""Alerts evaluated on the receiver (docs/alerts.md): the operator's rules over each
device's health and readings, their state in the database, notifications to webhooks.

:class:`AlertEngine` evaluates every rule on a schedule (``evaluate_every_s``) and, for one
device, whenever an upload from it has been stored.  ``now`` comes from an injected clock.
A condition that holds fires its alert once (the key ``rule:device[:stage]``); the alert
stays firing, without further notifications, until an evaluation finds the condition gone
and resolves it.  Each firing and resolve is offered to every webhook that takes the rule
(:mod:`cloud._webhook`); the state is marked delivered once all of them have it.  Nothing
here runs on the upload's path but :meth:`AlertEngine.upload_arrived`, which only notes the
device and wakes the evaluator.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import threading
from typing import Any

from core._clock import SYSTEM_CLOCK, Clock

from ._alert_rules import (
    AlertRules,
    BreakerOpenRule,
    ClockSkewRule,
    NoReadingsRule,
    SessionLostRule,
    SilentRule,
    StoreFullRule,
)
from ._alert_store import AlertRow, AlertState
from ._schedule import EvaluationSchedule
from ._webhook import WebhookSender

__all__ = ["AlertEngine", "build_engine", "conditions_for"]

log = logging.getLogger("edgepipe.cloud.alerts")

_SESSION_SNAPSHOTS = 5000  # at one a minute: more than 3 days


def _matches(rule: Any, device: str) -> bool:
    return any(fnmatch.fnmatchcase(device, g) for g in rule.devices)


def _minutes(ms: float) -> str:
    return f"{ms / 60_000:.0f} min"


class _Conditions:
    """The alerts that hold for one device now, as :class:`AlertRow` (state firing)."""

    def __init__(self, device: str, now: int) -> None:
        self.device, self.now = device, now
        self.rows: dict[str, AlertRow] = {}

    def add(
        self, rule: Any, summary: str, value: float | None, part: str | None = None, **labels: str
    ) -> None:
        key = f"{rule.name}:{self.device}" + (f":{part}" if part else "")
        lab = {
            "alertname": rule.name,
            "kind": rule.kind,
            "device": self.device,
            "severity": rule.severity,
            **labels,
        }
        self.rows[key] = AlertRow(
            key=key,
            rule=rule.name,
            kind=rule.kind,
            device=self.device,
            severity=rule.severity,
            state="firing",
            summary=f"{self.device}: {summary}",
            labels=lab,
            value=value,
            started_ms=self.now,
            updated_ms=self.now,
        )


def conditions_for(
    backend: AlertState, rules: AlertRules, device: dict[str, Any], now: int
) -> dict[str, AlertRow]:
    """Every alert of ``rules`` that holds for ``device`` (a row of ``get_device``)."""
    name = device["name"]
    mine = [r for r in rules.rules if _matches(r, name)]
    c = _Conditions(name, now)
    if not mine:
        return c.rows
    health_rules = (StoreFullRule, BreakerOpenRule, ClockSkewRule)
    latest: dict[str, Any] | None = None
    if any(isinstance(r, health_rules) for r in mine):
        snaps = backend.device_health(name, limit=1)  # type: ignore[attr-defined]
        latest = snaps[-1]["values"] if snaps else None
    for rule in mine:
        if isinstance(rule, StoreFullRule) and latest:
            quota = latest.get("store_quota_b") or 0
            if quota > 0:
                fill = latest.get("store_used_b", 0) / quota
                if fill > rule.above:
                    c.add(
                        rule,
                        f"store {fill:.0%} of its quota (above {rule.above:.0%})",
                        round(fill, 4),
                    )
        elif isinstance(rule, BreakerOpenRule) and latest:
            for k, v in sorted(latest.items()):
                if k.startswith("breaker_open:") and v:
                    stage = k[len("breaker_open:") :]
                    c.add(rule, f"stage {stage} breaker open", 1, stage, stage=stage)
        elif isinstance(rule, ClockSkewRule) and latest:
            skew = latest.get("clock_skew_ms", latest.get("receiver_skew_ms"))
            if isinstance(skew, int) and abs(skew) > rule.above_s * 1000:
                c.add(
                    rule,
                    f"clock off by {skew / 1000:+.0f} s (more than {rule.above_s:g} s)",
                    skew / 1000,
                )
        elif isinstance(rule, SessionLostRule):
            snaps = backend.device_health(  # type: ignore[attr-defined]
                name, since=now - int(rule.within_min * 60_000), limit=_SESSION_SNAPSHOTS
            )
            lost = 0
            for a, b in zip(snaps, snaps[1:], strict=False):
                x, y = a["values"].get("sessions_lost", 0), b["values"].get("sessions_lost", 0)
                if y > x:  # (a smaller value is a restart of the edge process)
                    lost += y - x
            if lost:
                c.add(
                    rule,
                    f"MQTT session lost {lost} time(s) in the last {rule.within_min:g} min",
                    lost,
                )
        elif isinstance(rule, SilentRule):
            seen = device.get("last_seen_ms") or device.get("created_ms") or now
            if now - seen > rule.for_min * 60_000:
                what = "no upload" if device.get("last_seen_ms") else "never uploaded"
                c.add(rule, f"{what} for {_minutes(now - seen)}", round((now - seen) / 60_000, 1))
        elif isinstance(rule, NoReadingsRule):
            newest = backend.newest_reading(name, rule.metric, rule.source)
            since = newest if newest is not None else (device.get("created_ms") or now)
            if now - since > rule.for_min * 60_000:
                what = rule.metric + (f" from {rule.source}" if rule.source else "")
                text = (
                    f"no {what} reading for {_minutes(now - since)}"
                    if newest is not None
                    else f"no {what} reading ever"
                )
                labels = {"metric": rule.metric} | ({"source": rule.source} if rule.source else {})
                c.add(rule, text, round((now - since) / 60_000, 1), **labels)
    return c.rows


class AlertEngine:
    """The rules, their state and the webhooks of one receiver."""

    def __init__(
        self,
        backend: Any,
        rules: AlertRules,
        senders: list[WebhookSender] | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.backend, self.rules, self.clock = backend, rules, clock
        self.senders = list(senders or [])
        for s in self.senders:
            s.on_done, s.on_dropped = self._delivered, self._dropped
        self._eval_lock = threading.Lock()
        self._done_lock = threading.Lock()
        #: (key, state, started_ms) -> the senders that still have to deliver it
        self._waiting: dict[tuple[str, str, int], set[int]] = {}
        self._schedule = EvaluationSchedule(self.evaluate, rules.evaluate_every_s, "alert")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.evaluations = 0
        self.last_evaluation_ms: int | None = None

    @property
    def last_error(self) -> str | None:
        """Why the last evaluation (or the start's delivery of old firings) failed."""
        return self._schedule.last_error

    def now_ms(self) -> int:
        return int(self.clock.time() * 1000)

    # -- evaluation (blocking: runs in a worker thread) ------------------------------------
    def evaluate(self, devices: set[str] | None = None) -> list[AlertRow]:
        """Evaluate every rule (for ``devices`` only, if given), store the transitions, offer
        them to the webhooks and return them (firings and resolves) in the order made."""
        with self._eval_lock:
            out = self._transitions(devices)
            self.notify(out)
            return out

    def _transitions(self, devices: set[str] | None) -> list[AlertRow]:
        now = self.now_ms()
        b = self.backend
        if devices is None:
            rows = b.list_devices()
        else:
            rows = [d for d in map(b.get_device, sorted(devices)) if d is not None]
        holds: dict[str, AlertRow] = {}
        for d in rows:
            holds.update(conditions_for(b, self.rules, d, now))
        firing = {a.key: a for a in b.alerts(state="firing", limit=10_000)}
        out: list[AlertRow] = []
        for key, a in holds.items():
            old = firing.get(key)
            if old is None:
                if b.fire_alert(a):
                    out.append(a)
            elif old.summary != a.summary or old.value != a.value:
                b.update_alert(key, a.summary, a.value, now)
        for key, old in firing.items():
            if key in holds or (devices is not None and old.device not in devices):
                continue
            done = b.resolve_alert(key, now)
            if done is not None:
                out.append(done)
        self.evaluations += 1
        self.last_evaluation_ms = now
        return out

    def notify(self, transitions: list[AlertRow]) -> None:
        """Offer each transition to the webhooks that take it (any thread)."""
        for a in transitions:
            takers = {i for i, s in enumerate(self.senders) if s.takes(a)}
            if not takers:
                self.backend.alert_notified(a.key, a.state, a.started_ms)
                continue
            with self._done_lock:
                self._waiting[(a.key, a.state, a.started_ms)] = takers
            for i in takers:
                self.senders[i].offer(a)

    def _delivered(self, sender: WebhookSender, a: AlertRow) -> None:
        """A sender has delivered (or was refused) ``a``; once all have, it is marked."""
        ident = (a.key, a.state, a.started_ms)
        with self._done_lock:
            left = self._waiting.get(ident)
            if left is None:
                return
            left.discard(self.senders.index(sender))
            if left:
                return
            del self._waiting[ident]
        try:
            self.backend.alert_notified(a.key, a.state, a.started_ms)
        except Exception:
            log.exception("could not mark alert %s delivered", a.key)

    def _dropped(self, sender: WebhookSender, a: AlertRow) -> None:
        """A sender's full queue dropped ``a``: it stays undelivered in the database (sent
        again at the next start) and is no longer waited for here."""
        ident = (a.key, a.state, a.started_ms)
        with self._done_lock:
            left = self._waiting.get(ident)
            if left is not None:
                left.discard(self.senders.index(sender))
                if not left:
                    del self._waiting[ident]

    def waiting(self) -> int:
        """Notifications some webhook has still to deliver."""
        with self._done_lock:
            return len(self._waiting)

    # -- the schedule (on the receiver's event loop) ---------------------------------------
    def upload_arrived(self, device: str) -> None:
        """An upload from ``device`` was stored: evaluate its rules soon.  Never blocks."""
        self._schedule.mark(device)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for s in self.senders:
            self._tasks.append(asyncio.create_task(s.run(), name="alert-webhook"))
        try:  # what the last run stored but could not deliver
            undelivered = await asyncio.to_thread(self.backend.undelivered_alerts)
            await asyncio.to_thread(self.notify, undelivered)
        except Exception as e:
            self._schedule.last_error = str(e)
            log.exception("could not read undelivered alerts")
        self._schedule.start()

    async def stop(self) -> None:
        await self._schedule.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for s in self.senders:
            s.close()

    def snapshot(self) -> dict[str, Any]:
        return {
            "evaluate_every_s": self.rules.evaluate_every_s,
            "evaluations": self.evaluations,
            "last_evaluation_ms": self.last_evaluation_ms,
            "last_error": self.last_error,
            "rules": [
                {"name": r.name, "kind": r.kind, "severity": r.severity} for r in self.rules.rules
            ],
            "webhooks": [s.snapshot() for s in self.senders],
        }


def build_engine(
    backend: Any,
    rules: AlertRules,
    secrets: dict[int, tuple[bytes | None, str | None]] | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
) -> AlertEngine:
    """An engine with one :class:`WebhookSender` per webhook of ``rules`` (``secrets``:
    per webhook index, its HMAC key and PagerDuty routing key)."""
    secrets = secrets or {}
    senders = [
        WebhookSender(
            w,
            key=secrets.get(i, (None, None))[0],
            routing_key=secrets.get(i, (None, None))[1],
            dashboard_url=rules.dashboard_url,
        )
        for i, w in enumerate(rules.webhooks)
    ]
    return AlertEngine(backend, rules, senders, clock=clock)
