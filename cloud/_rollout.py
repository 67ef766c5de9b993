"""Staged rollouts: the state machine (docs/rollout.md).

A rollout sends one bundle version to the devices of a labelled group in waves: a canary
wave, then waves of a share of the group.  :class:`RolloutEngine` evaluates every active
rollout on a schedule (``every_s``) and, for the rollouts of one device, whenever that
device checks in; ``now`` comes from an injected clock, so a test moves the soak time
forward instead of waiting it out.  Everything it decides is stored
(:mod:`cloud._rollout_store`) before it acts on it, so a restarted receiver carries on.

Per device of a started wave:

* ``downloading``: its desired bundle is the rollout's; it has not reported it active yet;
* ``applied``: it runs it, and its **health gate** is watched for the soak time: no trap, no
  open breaker, and its drop rate and dead-letter rate since the apply within a margin of
  its own rates before the change (the health it reported for its previous bundle, else its
  health snapshots of the hour before);
* ``healthy``: the gate held for the whole soak; ``failed``: it refused the bundle or the gate
  failed (the reason is kept).

The next wave starts when every device of the current one is healthy.  A failure halts the
rollout and rolls back the failing device (``policy: device``) or every device that got the
bundle (``policy: all``).  Devices refuse a version lower than one they applied, so a
rollback is a **new bundle version with the previous bundle's chain** (its filters text and
its modules, stored already).  The receiver holds no signing key, so ``rollout start``
signs these (one per bundle the group's devices run, urgent, above the rollout's version,
and a *local bundle* for the devices that ran no bundle: it sends them back to the chain
their own config names) and stores them with the rollout; the engine only makes them desired.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from typing import Any

from core._clock import SYSTEM_CLOCK, Clock

from ._rollout_store import ACTIVE_STATES, UnknownRollout
from ._schedule import EvaluationSchedule

__all__ = [
    "DEFAULT_SPEC",
    "RolloutEngine",
    "health_rates",
    "parse_duration",
    "plan_waves",
]

log = logging.getLogger("edgepipe.cloud.rollout")

#: The gate's defaults (``rollout start`` options).
DEFAULT_SPEC: dict[str, Any] = {
    "canary": "1",
    "wave": "25%",
    "soak_ms": 30 * 60_000,
    "policy": "device",
    "max_drop_increase": 0.05,
    "max_dead_letter_increase": 0.01,
    "min_readings": 0,
}
#: How far back health snapshots give a device's rates before the change.
BASELINE_WINDOW_MS = 3_600_000
#: How long the rollback bundles ``rollout start`` signs stay valid.
ROLLBACK_VALID_DAYS = 30.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _chain_of(prev: int | None) -> str:
    """What a rollback returns a device to, in words."""
    return "its local chain" if prev is None else f"the chain of bundle {prev}"


def parse_duration(text: str) -> int:
    """``30m``, ``90s``, ``2h``, ``1d``, ``500ms`` (a bare number is seconds) -> ms."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 30m, 90s, 2h)")
    ms = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if ms > 30 * 86_400_000:
        raise ValueError(f"{text!r} is longer than 30 days")
    return int(ms)


def _count(text: str, total: int, what: str) -> int:
    """``N`` or ``P%`` of ``total`` -> a number of devices, at least 1."""
    t = text.strip()
    try:
        if t.endswith("%"):
            p = float(t[:-1])
            if not 0 < p <= 100:
                raise ValueError
            return max(1, math.ceil(total * p / 100))
        n = int(t)
        if n < 1:
            raise ValueError
        return min(n, total)
    except ValueError:
        raise ValueError(f"{what} must be a count (N >= 1) or a share (P%, 0 < P <= 100)") from None


def plan_waves(devices: list[str], canary: str, wave: str) -> list[list[str]]:
    """The group's devices (sorted) in waves: the canary, then waves of ``wave`` each."""
    devices = sorted(devices)
    if not devices:
        return []
    c = _count(canary, len(devices), "--canary")
    size = _count(wave, len(devices), "--wave")
    waves = [devices[:c]]
    rest = devices[c:]
    while rest:
        waves.append(rest[:size])
        rest = rest[size:]
    return waves


def health_rates(health: dict[str, Any] | None) -> dict[str, Any]:
    """Per-stage health since the apply -> readings in, drop rate, dead-letter rate, the
    stages that trapped (with codes) and those whose breaker is open."""
    n_in = drops = dead = 0
    traps: dict[str, list[str]] = {}
    breakers: list[str] = []
    for stage, h in (health or {}).items():
        n_in = max(n_in, int(h.get("in", 0)))
        drops += sum(int(v) for v in (h.get("drops") or {}).values())
        dead += int(h.get("dead_letters", 0))
        if h.get("traps"):
            traps[stage] = sorted(h["traps"])
        if h.get("breaker_open"):
            breakers.append(stage)
    return {
        "in": n_in,
        "drop_rate": drops / n_in if n_in else 0.0,
        "dead_letter_rate": dead / n_in if n_in else 0.0,
        "traps": traps,
        "breakers": breakers,
    }


def _snapshot_rates(snaps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Rates over a device's health snapshots (the difference of the first and last)."""
    if len(snaps) < 2:
        return None
    first, last = snaps[0].get("values") or {}, snaps[-1].get("values") or {}

    def delta(pred: Callable[[str], bool]) -> dict[str, int]:
        return {k: max(0, int(v) - int(first.get(k, 0))) for k, v in last.items() if pred(k)}

    stages = delta(lambda k: k.startswith("stage:") and k.endswith(":in"))
    n_in = max(stages.values(), default=0)
    drops = sum(delta(lambda k: k.startswith("drops:")).values())
    dead = delta(lambda k: k == "dead_letters").get("dead_letters", 0)
    if not n_in:
        return None
    return {"in": n_in, "drop_rate": drops / n_in, "dead_letter_rate": dead / n_in}


class RolloutEngine:
    """Evaluates the stored rollouts of ``backend`` by ``clock``'s time."""

    def __init__(self, backend: Any, *, clock: Clock = SYSTEM_CLOCK, every_s: float = 5.0) -> None:
        self.backend, self.clock, self.every_s = backend, clock, every_s
        self._lock = threading.Lock()
        self._schedule = EvaluationSchedule(self.evaluate, every_s, "rollout")
        self.evaluations = 0

    @property
    def last_error(self) -> str | None:
        """Why the last scheduled evaluation failed (None: it did not)."""
        return self._schedule.last_error

    def now_ms(self) -> int:
        return int(self.clock.time() * 1000)

    # -- evaluation (blocking) -------------------------------------------------------------
    def evaluate(self, devices: set[str] | None = None) -> None:
        """Step every active rollout (those with one of ``devices``, if given)."""
        with self._lock:
            for r in self.backend.list_rollouts(active_only=True, limit=1000):
                ro = self.backend.rollout(r["id"])
                if ro is None:
                    continue
                if devices is not None and not devices & {d["device"] for d in ro["devices"]}:
                    continue
                try:
                    self._step(ro)
                except UnknownRollout:
                    continue
            self.evaluations += 1

    def _event(self, ro: dict[str, Any], kind: str, detail: str, device: str | None = None) -> None:
        self.backend.rollout_event(ro["id"], kind, detail, device=device, now=self.now_ms())

    def _set(self, ro: dict[str, Any], d: dict[str, Any], **fields: Any) -> None:
        self.backend.update_rollout_device(ro["id"], d["device"], now=self.now_ms(), **fields)
        d.update(fields)

    def _step(self, ro: dict[str, Any]) -> None:
        b, now, version, spec = self.backend, self.now_ms(), ro["bundle_version"], ro["spec"]
        failures: list[dict[str, Any]] = []
        for d in ro["devices"]:
            if d["state"] in ("pending", "skipped", "rolled_back"):
                continue
            st = b.bundle_state(d["device"]) or {}
            if d["state"] == "downloading":
                if st.get("active_version") == version:
                    self._set(ro, d, state="applied", applied_ms=now, reason=None)
                    self._event(ro, "applied", f"runs bundle {version}", d["device"])
                elif st.get("status") == "failed" and st.get("status_version") == version:
                    why = (
                        f"refused the bundle: {st.get('status_reason')}: {st.get('status_detail')}"
                    )
                    self._fail(ro, d, why)
                    failures.append(d)
                elif (
                    st.get("status") in ("waiting", "downloading")
                    and st.get("status_version") == version
                    and d["reason"] != st.get("status_detail")
                ):
                    self._set(ro, d, reason=st.get("status_detail"))
            if d["state"] == "applied":
                why = self._gate(d, st, version, spec)
                if why is not None:
                    self._fail(ro, d, why)
                    failures.append(d)
                elif now - (d["applied_ms"] or now) >= spec["soak_ms"] and self._enough(st, spec):
                    self._set(ro, d, state="healthy", reason=None)
                    self._event(ro, "healthy", self._held(st, spec), d["device"])
            if d["state"] == "rolling_back":
                rb = d["rollback_version"]
                if rb is not None and st.get("active_version") == rb:
                    self._set(ro, d, state="rolled_back")
                    self._event(
                        ro, "rolled_back", f"runs bundle {rb} ({_chain_of(d['previous_version'])})"
                        f" again: {d['reason']}", d["device"],
                    )  # fmt: skip
                elif st.get("status") == "failed" and st.get("status_version") == rb:
                    why = f"refused rollback bundle {rb}: {st.get('status_reason')}"
                    if not (d["reason"] or "").endswith(why):
                        self._set(ro, d, reason=f"{d['reason']}; {why}")
                        self._event(ro, "rollback_refused", why, d["device"])
        if failures and ro["state"] in ("running", "paused"):
            first = failures[0]
            reason = f"gate failed on {first['device']}: {first['reason']}"
            b.update_rollout(ro["id"], now=now, state="halted", reason=reason)
            ro.update(state="halted", reason=reason)
            self._event(ro, "halted", reason)
            targets = failures if spec["policy"] == "device" else ro["devices"]
            # devices still on their way to the bundle do not get it (nor does a later wave)
            targets = targets + [d for d in ro["devices"] if d["state"] == "downloading"]
            for d in targets:
                self._roll_back(ro, d, d["reason"] if d in failures else f"halted: {reason}")
            for d in ro["devices"]:
                if d["state"] == "pending":
                    self._set(ro, d, state="skipped", reason="the rollout halted before its wave")
        elif failures:  # halted already: roll these back too
            for d in failures:
                self._roll_back(ro, d, d["reason"])
        if ro["state"] == "halted":
            if all(d["state"] not in ("rolling_back",) for d in ro["devices"]):
                b.update_rollout(ro["id"], now=now, state="rolled_back")
                self._event(ro, "rolled_back", "every device to roll back runs its previous chain")
            return
        if ro["state"] != "running":
            return
        wave = ro["current_wave"]
        current = [d for d in ro["devices"] if d["wave"] == wave]
        if wave >= 0 and not all(d["state"] == "healthy" for d in current):
            return
        if wave + 1 >= ro["waves"]:
            b.update_rollout(ro["id"], now=now, state="done", reason=None)
            self._event(ro, "done", f"every device runs bundle {version} and is healthy")
            return
        self._start_wave(ro, wave + 1)

    def _start_wave(self, ro: dict[str, Any], wave: int) -> None:
        b, now, version = self.backend, self.now_ms(), ro["bundle_version"]
        members = [d for d in ro["devices"] if d["wave"] == wave]
        b.update_rollout(ro["id"], now=now, current_wave=wave)
        ro["current_wave"] = wave
        name = "canary" if wave == 0 else f"wave {wave}"
        self._event(ro, "wave", f"{name}: {', '.join(d['device'] for d in members)}")
        for d in members:
            st = b.bundle_state(d["device"]) or {}
            baseline = self._baseline(d["device"], st)
            self._set(
                ro,
                d,
                state="downloading",
                started_ms=now,
                previous_version=st.get("active_version"),
                previous_desired=st.get("desired_version"),
                baseline=baseline,
                reason=None,
            )
            b.set_desired(d["device"], version, f"rollout {ro['id']} {name}", now=now)
            if st.get("active_version") == version:  # it runs this bundle already
                self._set(ro, d, state="applied", applied_ms=now)
                self._event(ro, "applied", f"runs bundle {version} already", d["device"])

    def _baseline(self, device: str, st: dict[str, Any]) -> dict[str, Any]:
        """The device's own rates before the change."""
        if st.get("active_version") is not None and st.get("health"):
            r = health_rates(st["health"])
            if r["in"]:
                return {k: r[k] for k in ("in", "drop_rate", "dead_letter_rate")} | {
                    "source": f"bundle {st['active_version']} since its apply"
                }
        now = self.now_ms()
        snaps = self.backend.device_health(device, since=now - BASELINE_WINDOW_MS, limit=2000)
        r2 = _snapshot_rates(snaps)
        if r2 is not None:
            return r2 | {"source": "health snapshots of the hour before"}
        return {"in": 0, "drop_rate": 0.0, "dead_letter_rate": 0.0, "source": "none (taken as 0)"}

    @staticmethod
    def _gate(
        d: dict[str, Any], st: dict[str, Any], version: int, spec: dict[str, Any]
    ) -> str | None:
        """Why the health gate fails now (None: it holds)."""
        if st.get("active_version") != version:
            return f"no longer runs bundle {version} (runs {st.get('active_version')})"
        r = health_rates(st.get("health"))
        if r["traps"]:
            stage, codes = next(iter(r["traps"].items()))
            return f"trap in stage {stage}: {', '.join(codes)}"
        if r["breakers"]:
            return f"breaker open in stage {r['breakers'][0]}"
        base = d["baseline"] or {}
        if r["in"] >= max(1, spec["min_readings"]):
            for key, margin in (
                ("drop_rate", spec["max_drop_increase"]),
                ("dead_letter_rate", spec["max_dead_letter_increase"]),
            ):
                before = float(base.get(key, 0.0))
                if r[key] > before + margin:
                    return (
                        f"{key.replace('_', ' ')} {r[key]:.1%} over {r['in']} readings, "
                        f"more than {before:.1%} before the change + {margin:.1%}"
                    )
        return None

    @staticmethod
    def _enough(st: dict[str, Any], spec: dict[str, Any]) -> bool:
        return health_rates(st.get("health"))["in"] >= spec["min_readings"]

    @staticmethod
    def _held(st: dict[str, Any], spec: dict[str, Any]) -> str:
        r = health_rates(st.get("health"))
        return (
            f"gate held for {spec['soak_ms'] / 1000:g} s: {r['in']} readings, drop rate "
            f"{r['drop_rate']:.1%}, dead-letter rate {r['dead_letter_rate']:.1%}, no trap"
        )

    def _fail(self, ro: dict[str, Any], d: dict[str, Any], why: str) -> None:
        self._set(ro, d, state="failed", reason=why)
        self._event(ro, "failed", why, d["device"])

    # -- rollback ----------------------------------------------------------------------------
    def _roll_back(self, ro: dict[str, Any], d: dict[str, Any], why: str) -> None:
        b, now, version = self.backend, self.now_ms(), ro["bundle_version"]
        if d["state"] in ("pending", "skipped", "rolled_back", "rolling_back"):
            if d["state"] == "pending":
                self._set(ro, d, state="skipped", reason="the rollout halted before its wave")
            return
        st = b.bundle_state(d["device"]) or {}
        if st.get("active_version") != version:
            # it never ran the bundle: it keeps what it runs, and desires it again
            b.set_desired(
                d["device"], d["previous_desired"], f"rollout {ro['id']} halted: {why}", now=now
            )
            if d["state"] != "failed":
                self._set(ro, d, state="skipped", reason=f"halted before it applied: {why}")
            return
        prev = d["previous_version"]
        try:
            rb = self._rollback_bundle(ro, prev)
        except Exception as e:  # none signed for it, a database error: recorded
            self._set(ro, d, reason=f"{why}; cannot make the rollback bundle: {e}")
            self._event(ro, "rollback_impossible", str(e), d["device"])
            return
        chain = _chain_of(prev)
        b.set_desired(d["device"], rb, f"rollout {ro['id']} rollback to {chain}: {why}", now=now)
        self._set(ro, d, state="rolling_back", rollback_version=rb, reason=why)
        self._event(ro, "rollback", f"bundle {rb} ({chain}) desired", d["device"])

    def _rollback_bundle(self, ro: dict[str, Any], prev: int | None) -> int:
        """The rollback bundle for devices that ran bundle ``prev`` (None: no bundle, their
        local chain): signed by ``rollout start`` (the receiver holds no signing key), stored
        with the rollout's spec."""
        rb = (ro["spec"].get("rollbacks") or {}).get("local" if prev is None else str(prev))
        if rb is None and prev is None:
            raise RuntimeError(
                "no local bundle was signed when the rollout started (the device ran a bundle "
                "then): sign one with 'edgepipe-cloud bundle create --local' and desire it"
            )
        if rb is None:
            raise RuntimeError(
                f"no rollback bundle was signed for bundle {prev} when the rollout started "
                f"(the device ran another bundle then): sign one with 'edgepipe-cloud bundle "
                f"create --from {prev}' and desire it"
            )
        if self.backend.get_bundle(int(rb)) is None:
            raise RuntimeError(f"rollback bundle {rb} is no longer stored")
        return int(rb)

    # -- operator actions (blocking) ----------------------------------------------------------
    def act(self, rollout_id: int, action: str, who: str) -> dict[str, Any]:
        """``pause``, ``resume`` or ``abort`` by ``who``; -> the rollout.  ValueError when the
        action does not apply in its state, :class:`UnknownRollout`."""
        with self._lock:
            b, now = self.backend, self.now_ms()
            ro = b.rollout(rollout_id)
            if ro is None:
                raise UnknownRollout(rollout_id)
            state = ro["state"]
            if action == "pause":
                if state != "running":
                    raise ValueError(f"rollout {rollout_id} is {state}, not running")
                b.update_rollout(rollout_id, now=now, state="paused")
            elif action == "resume":
                if state != "paused":
                    raise ValueError(f"rollout {rollout_id} is {state}, not paused")
                b.update_rollout(rollout_id, now=now, state="running")
            elif action == "abort":
                if state not in ACTIVE_STATES:
                    raise ValueError(f"rollout {rollout_id} is {state} already")
                for d in ro["devices"]:
                    if d["state"] == "pending":
                        b.update_rollout_device(
                            rollout_id, d["device"], now=now, state="skipped", reason="aborted"
                        )
                    elif d["state"] == "downloading":  # not applied yet: it keeps what it runs
                        b.set_desired(
                            d["device"], d["previous_desired"], f"rollout {rollout_id} aborted",
                            now=now,
                        )  # fmt: skip
                        b.update_rollout_device(
                            rollout_id, d["device"], now=now, state="skipped", reason="aborted"
                        )
                b.update_rollout(rollout_id, now=now, state="aborted", reason=f"aborted by {who}")
            else:
                raise ValueError(f"unknown action {action!r}")
            b.rollout_event(rollout_id, action, f"by {who}", now=now)
            out = b.rollout(rollout_id)
        if action == "resume":
            self.evaluate()
        return out

    # -- the schedule (on the receiver's event loop) ------------------------------------------
    def device_reported(self, device: str) -> None:
        """A check-in of ``device`` was stored: step its rollouts soon.  Never blocks."""
        self._schedule.mark(device)

    async def start(self) -> None:
        self._schedule.start()

    async def stop(self) -> None:
        await self._schedule.stop()
