"""The device side of signed chain bundles: ask, download, verify, apply, report
(docs/rollout.md).

On the sync worker's schedule (every ``sync.bundles.check_every_s`` while a link is up) the
:class:`BundleAgent` checks in with the receiver (``POST /v1/bundle``, signed like an upload):
it reports its bundle state -- the active version, when it was applied, the previous one,
the outcome of the last attempt with its reason, and per-stage health since the apply (records
in and out, drops by reason, dead letters, traps, breaker) -- and gets the bundle the cloud
wants it to run.  A new one is then

1. verified (:func:`protocol._bundle.verify`: a trusted and not retired key, the signature,
   the fleet, the validity window by the worker's clock, and a version above the highest
   ever applied here -- persisted, so an older bundle replayed after a restart is refused);
2. held back on a metered link unless its priority is ``urgent`` (and then only if what is
   missing fits the day's byte budget); bytes downloaded count against the budget;
3. downloaded: only the modules missing from the content-addressed cache beside the store
   (``<store>.bundles/modules/<sha256>.wasm``), each checked against its manifest entry;
4. laid out as the operator wrote it (the filters YAML and its modules, in a staging
   directory) and handed to the :class:`BundleApplier` -- the composition root's chain
   deployer, which runs every check of ``edgepipe validate`` and installs it (keeping the
   previous chain for rollback); the running chain's watcher swaps it in between batches.
   A *local bundle* (``"chain": "local"``: no filters, no modules) instead has the applier
   move the watcher back onto the chain file the device's own config names; the state then
   says ``chain: local``, so a restart keeps running that chain.

Any refusal leaves the running chain as it is and is reported with its reason at once (the
cloud's answer then stops sending that manifest).  The cloud only ever offers the *latest*
desired bundle, so a device offline for a week applies that one and none in between.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from config._models import SyncBundlesConfig
from core._clock import SYSTEM_CLOCK, Clock
from core._errors import SyncError
from core._fsutil import atomic_write
from core._metrics import METRICS
from protocol._bundle import (
    DEVICE_REASONS,
    BundleRefused,
    Manifest,
    check_module,
    open_envelope,
    parse_public_keys,
    verify,
)

from ._health import metric_fields
from ._link import Link
from ._transport import Transport

__all__ = ["BundleAgent", "BundleApplier", "BundleState", "CannotApply", "stage_health"]

log = logging.getLogger("edgepipe.sync")

PATH_CHECK_IN = "/v1/bundle"
PATH_MODULES = "/v1/modules/"
#: Largest check-in answer read (a manifest is at most 256 KiB, base64 in JSON).
MAX_ANSWER = 512 * 1024

_outcomes = METRICS.counter(
    "edgepipe_bundle_checks_total",
    "bundle check-ins with the receiver, by outcome (none: nothing new, applied, refused, "
    "waiting: held back for an unmetered link or the budget, failed: no answer)",
    ["outcome"],
)
_refused = METRICS.counter(
    "edgepipe_bundles_refused_total", "bundles refused by this device, by reason", ["reason"]
)
_downloaded = METRICS.counter(
    "edgepipe_bundle_module_bytes_total", "bytes of bundle modules downloaded"
)
_active = METRICS.gauge("edgepipe_bundle_active_version", "version of the applied bundle (0: none)")


class CannotApply(Exception):
    """The applier refused: ``reason`` is ``invalid_chain`` (what ``edgepipe validate``
    refuses, ``detail`` located in the filters file), ``chain_source_local`` or
    ``install_failed``."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in DEVICE_REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class BundleApplier(Protocol):
    """What installs a verified bundle's chain (``pipeline._compose`` wires the deployer)."""

    def refusal(self) -> CannotApply | None:
        """Why no bundle can be applied on this device at all (None: they can)."""

    def apply(self, filters: Path) -> list[str]:
        """Validate and install the filters file ``filters`` (its modules beside it, as it
        names them); -> the chain's stage names.  :class:`CannotApply`, nothing changed."""

    def apply_local(self) -> tuple[list[str], str | None]:
        """Go back to the chain file the device's config names (a local bundle); -> its
        stage names and, when nothing had to change, a note saying why.  :class:`CannotApply`,
        nothing changed."""


@dataclass
class BundleState:
    """Persisted beside the store (durably: ``highest`` guards against downgrades)."""

    highest: int = 0
    active_version: int | None = None
    previous_version: int | None = None
    applied_ms: int | None = None
    stages: list[str] = field(default_factory=list)
    #: what the active version runs: ``bundle`` (its chain) or ``local`` (the configured one)
    chain: str | None = None
    status: str | None = None
    version: int | None = None
    reason: str | None = None
    detail: str | None = None
    #: metric fields at the apply (of this process: ``baseline_pid``) to count health from
    baseline: dict[str, int] = field(default_factory=dict)
    baseline_pid: int | None = None

    @classmethod
    def load(cls, path: Path) -> BundleState:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:
            # never silently forget the highest version applied: that would allow a downgrade
            raise SyncError(f"bundle state {path} is unreadable ({e}); refusing bundles") from None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self), sort_keys=True).encode(), durable=True)


def stage_health(
    stages: list[str], now_fields: dict[str, int], baseline: dict[str, int], since_ms: int | None
) -> dict[str, dict[str, Any]]:
    """Per stage since the apply: ``in``, ``out``, ``drops`` by reason, ``dead_letters``,
    ``traps`` by code, ``breaker_open`` (the health snapshot's metric fields, minus the
    values they had at the apply)."""
    out: dict[str, dict[str, Any]] = {}
    want = set(stages)
    for name in stages[:64]:
        out[name] = {"in": 0, "out": 0, "drops": {}, "dead_letters": 0, "traps": {}}
        out[name]["breaker_open"] = 0
        if since_ms is not None:
            out[name]["since_ms"] = since_ms
    for key, v in now_fields.items():
        parts = key.split(":")
        if len(parts) < 2 or parts[1] not in want or parts[1] not in out:
            continue
        row = out[parts[1]]
        delta = max(0, v - baseline.get(key, 0))
        if parts[0] == "stage" and len(parts) == 3 and parts[2] in ("in", "out"):
            row[parts[2]] = delta
        elif parts[0] in ("drops", "traps") and len(parts) == 3 and len(row[parts[0]]) < 32:
            if delta:
                row[parts[0]][_label(parts[2])] = delta
        elif parts[0] == "dead_letters" and len(parts) == 2:
            row["dead_letters"] = delta
        elif parts[0] == "breaker_open" and len(parts) == 2:
            row["breaker_open"] = int(v > 0)  # a gauge: as it is now
    return out


class BundleAgent:
    """Checks in, applies what is new and valid, reports (see the module docstring)."""

    def __init__(
        self,
        cfg: SyncBundlesConfig,
        *,
        transport: Transport,
        applier: BundleApplier,
        state_path: Path,
        cache_dir: Path,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.cfg = cfg
        self.transport = transport
        self.applier = applier
        self.state_path = Path(state_path)
        self.cache_dir = Path(cache_dir)
        self._clock = clock
        self.trusted = parse_public_keys(cfg.trusted_keys)
        self.retired = parse_public_keys(cfg.retired_keys)
        self._broken: str | None = None
        try:
            self.state = BundleState.load(self.state_path)
        except SyncError as e:  # the pipeline runs on; bundles are refused until it is fixed
            log.error("%s", e)
            self._broken, self.state = str(e), BundleState()
        if self.state.status == "failed" and self.state.reason != "download_failed":
            # a new process may have a new config (a key trusted now): try that version again
            st = self.state
            st.status = "applied" if st.active_version is not None else None
            st.version, st.reason, st.detail = st.active_version, None, None
        _active.set(self.state.active_version or 0)
        self._next_check = 0.0
        self._started_ms = self._now_ms()

    def _now_ms(self) -> int:
        return int(self._clock.time() * 1000)

    def due(self) -> bool:
        return self._clock.monotonic() >= self._next_check

    # -- the report -------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        st = self.state
        out: dict[str, Any] = {
            "active_version": st.active_version,
            "previous_version": st.previous_version,
            "applied_ms": st.applied_ms,
            "status": st.status,
            "version": st.version,
            "reason": st.reason,
            "detail": st.detail[:500] if st.detail else None,
        }
        if st.chain == "local":  # only then (a receiver before local bundles refuses the field)
            out["chain"] = "local"
        if st.stages:
            same_process = st.baseline_pid == os.getpid()
            baseline = st.baseline if same_process else {}
            since = st.applied_ms if same_process else max(st.applied_ms or 0, self._started_ms)
            out["health"] = stage_health(st.stages, metric_fields(), baseline, since)
        return out

    # -- one round ---------------------------------------------------------------------------
    async def check(self, link: Link, budget_left: int | None) -> int:
        """One check-in (and, when there is something new, a second one reporting the
        outcome); -> bytes sent and received, for the link's budget.  SyncError when the
        receiver cannot be reached (the worker backs off as for uploads)."""
        self._next_check = self._clock.monotonic() + self.cfg.check_every_s
        used, desired = await self._check_in(link)
        envelope = None if desired is None else desired.get("envelope")
        st = self.state
        if desired is not None and envelope is None and desired.get("version") == st.version:
            # the answer leaves out a manifest this device said it holds already
            if st.status in ("waiting", "downloading") or st.reason == "download_failed":
                envelope = self._pending()
        if desired is None or envelope is None:
            _outcomes.inc(1, "none")
            return used
        if desired.get("envelope") is not None:
            self._keep_pending(envelope)
        left = None if budget_left is None else budget_left - used
        outcome, n = await self._consider(dict(desired, envelope=envelope), link, left)
        used += n
        _outcomes.inc(1, outcome)
        if outcome != "none":
            n, _ = await self._check_in(link)  # say what happened at once
            used += n
        return used

    async def _check_in(self, link: Link) -> tuple[int, dict[str, Any] | None]:
        body = json.dumps(self.report(), separators=(",", ":")).encode()
        status, data, _ = await asyncio.to_thread(
            self.transport.signed, "POST", PATH_CHECK_IN, body, link.kind, limit=MAX_ANSWER
        )
        if status == 200 and len(data) > MAX_ANSWER:
            status = 413
        if status != 200:
            _outcomes.inc(1, "failed")
            raise SyncError(
                f"{self.transport.where} refused the bundle check-in: {status} "
                f"{data[:200].decode(errors='replace')}",
                status=status,
            )
        try:
            answer = json.loads(data)
            desired = answer["desired"]
            if desired is not None and not isinstance(desired, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise SyncError("the receiver sent an unreadable bundle check-in answer") from None
        return len(body) + len(data), desired

    async def _consider(
        self, desired: dict[str, Any], link: Link, budget_left: int | None
    ) -> tuple[str, int]:
        """-> (outcome, bytes downloaded)."""
        st = self.state
        try:
            data, sig, kid = open_envelope(desired.get("envelope"))
            m = verify(
                data,
                sig,
                kid,
                trusted=self.trusted,
                retired=self.retired,
                now_ms=self._now_ms(),
                applied_version=st.highest,
                fleet=self.cfg.fleet,
            )
        except BundleRefused as e:
            version = e.version if e.version is not None else _int(desired.get("version"))
            self._refused(version, e.reason, e.detail)
            return "refused", 0
        if st.status == "failed" and st.version == m.version and st.reason != "download_failed":
            return "none", 0  # refused before; the answer should not have carried it again
        blocked = self.applier.refusal()
        if m.is_local and blocked is not None and blocked.reason == "chain_source_local":
            blocked = None  # it runs its local chain already: applying is a no-op
        if self._broken is not None:
            blocked = CannotApply("install_failed", self._broken)
        if blocked is not None:
            self._refused(m.version, blocked.reason, blocked.detail)
            return "refused", 0
        missing = [e for e in m.modules if not self._cached(e.sha256).exists()]
        need = sum(e.size for e in missing)
        if link.metered and m.priority != "urgent":
            return self._waiting(
                m, f"a normal-priority bundle waits for an unmetered link (now {link.kind})"
            )
        if budget_left is not None and need > budget_left:
            return self._waiting(
                m,
                f"its {need} bytes of modules exceed what is left of the {link.kind} budget today",
            )
        self._set(status="downloading", version=m.version, reason=None, detail=None)
        got = 0
        try:
            for entry in missing:
                got += await self._download(entry, m, link)
        except BundleRefused as e:
            self._refused(m.version, e.reason, e.detail)
            return "refused", got
        except SyncError as e:
            self._set(status="failed", version=m.version, reason="download_failed", detail=str(e))
            raise
        return await self._apply(m), got

    def _waiting(self, m: Manifest, why: str) -> tuple[str, int]:
        if self.state.status != "waiting" or self.state.version != m.version:
            log.info("bundle version %d waits: %s", m.version, why)
            self._set(status="waiting", version=m.version, reason=None, detail=why)
            return "waiting", 0
        return "none", 0  # nothing new to report

    def _pending(self) -> dict[str, Any] | None:
        try:
            obj = json.loads((self.cache_dir / "pending.json").read_text())
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def _keep_pending(self, envelope: Any) -> None:
        """The manifest being worked on, so that a wait or a failed download can resume
        without the receiver sending it again (it is verified again when used)."""
        try:
            atomic_write(
                self.cache_dir / "pending.json", json.dumps(envelope).encode(), durable=False
            )
        except (OSError, TypeError, ValueError):
            pass

    def _cached(self, sha256: str) -> Path:
        return self.cache_dir / "modules" / f"{sha256}.wasm"

    async def _download(self, entry: Any, m: Manifest, link: Link) -> int:
        status, data, _ = await asyncio.to_thread(
            self.transport.signed,
            "GET",
            PATH_MODULES + entry.sha256,
            b"",
            link.kind,
            limit=entry.size,
        )
        if status != 200:
            raise SyncError(
                f"{self.transport.where} refused module {entry.path} ({entry.sha256[:12]}): {status}",
                status=status,
            )
        check_module(entry, data, version=m.version)
        atomic_write(self._cached(entry.sha256), data, durable=False)
        _downloaded.inc(len(data))
        return len(data)

    async def _apply(self, m: Manifest) -> str:
        if m.is_local:
            return await self._apply_local(m)
        staging = self.cache_dir / "staging" / f"v{m.version}"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            for entry in m.modules:  # paths are checked: relative, no '..', no hidden parts
                dest = staging / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                data = self._cached(entry.sha256).read_bytes()
                check_module(entry, data, version=m.version)  # the cache is not trusted either
                dest.write_bytes(data)
            filters = staging / "filters.yaml"
            filters.write_text(m.filters_text)
        except BundleRefused as e:
            self._cached(entry.sha256).unlink(missing_ok=True)  # a damaged cached copy
            self._refused(m.version, e.reason, e.detail)
            return "refused"
        except OSError as e:
            self._refused(m.version, "install_failed", f"cannot lay out the bundle: {e}")
            return "refused"
        # durable before the chain is installed: a crash after the install cannot reopen a
        # downgrade to a version between the old highest and this one
        self._set(highest=max(self.state.highest, m.version))
        try:
            stages = await asyncio.to_thread(self.applier.apply, filters)
        except CannotApply as e:
            self._refused(m.version, e.reason, e.detail)
            return "refused"
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self._applied(m, stages, "bundle", None)

    async def _apply_local(self, m: Manifest) -> str:
        self._set(highest=max(self.state.highest, m.version))  # as for any bundle
        try:
            stages, note = await asyncio.to_thread(self.applier.apply_local)
        except CannotApply as e:
            self._refused(m.version, e.reason, e.detail)
            return "refused"
        return self._applied(m, stages, "local", note)

    def _applied(self, m: Manifest, stages: list[str], chain: str, note: str | None) -> str:
        prev = self.state.active_version
        self._set(
            active_version=m.version,
            chain=chain,
            previous_version=prev,
            applied_ms=self._now_ms(),
            stages=stages,
            status="applied",
            version=m.version,
            reason=None,
            detail=note,
            baseline=metric_fields(),
            baseline_pid=os.getpid(),
        )
        _active.set(m.version)
        what = "its configured (local) chain" if chain == "local" else "its chain"
        log.info(
            "bundle version %d applied, running %s (previous: %s)%s",
            m.version,
            what,
            prev,
            f": {note}" if note else "",
        )
        return "applied"

    def _refused(self, version: int | None, reason: str, detail: str) -> None:
        _refused.inc(1, reason)
        log.warning(
            "bundle version %s refused, the running chain stays: %s: %s", version, reason, detail
        )
        self._set(status="failed", version=version, reason=reason, detail=detail[:500])

    def _set(self, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self.state, k, v)
        self.state.save(self.state_path)


def _label(text: str) -> str:
    """A drop reason or trap code as the receiver takes it: ``[A-Za-z0-9_.:-]``, 64 at most."""
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", text)[:64] or "-"


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None
