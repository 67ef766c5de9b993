"""The ``rollout`` and ``devices label`` commands of ``edgepipe-cloud`` (docs/rollout.md).

    edgepipe-cloud devices label NAME site=north ring=beta [--remove old]
    edgepipe-cloud rollout start BUNDLE --group site=north [--canary 1|10%] [--wave 25%]
        [--soak 30m] [--policy device|all] [--max-drop-increase 0.05]
        [--max-dead-letter-increase 0.01] [--min-readings 0]
    edgepipe-cloud rollout status [ID] [--json]     # the timeline
    edgepipe-cloud rollout list | pause ID | resume ID | abort ID

``start`` refuses (exit 1, nothing stored) a bundle that is not stored or not signed by one
of the fleet's signing keys, a group no device is in, and a group that overlaps an active
rollout's devices.  The receiver (``serve``) runs the rollout from there on; ``start`` only
begins its canary wave.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from core._clock import now_ms
from protocol._bundle import BundleRefused, verify

from ._backend import Backend
from ._errors import CloudError
from ._rollout import (
    DEFAULT_SPEC,
    ROLLBACK_VALID_DAYS,
    RolloutEngine,
    parse_duration,
    plan_waves,
)
from ._rollout_store import BadLabel, RolloutConflict, UnknownRollout, parse_label
from ._settings import Settings

__all__ = [
    "RolloutRefused",
    "add_label_parsers",
    "add_rollout_parser",
    "label_command",
    "rollout_command",
]


class RolloutRefused(CloudError):
    """A rollout that cannot start (the message says why); nothing was stored."""


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for text in items:
        k, v = parse_label(text)
        out[k] = v
    return out


def label_command(args: argparse.Namespace, backend: Backend) -> int:
    labels = backend.set_labels(
        args.name, _labels(args.labels), [parse_label(k, value=False)[0] for k in args.remove]
    )
    print(json.dumps({"device": args.name, "labels": labels}, sort_keys=True))
    return 0


def add_labels(backend: Backend, name: str, labels: list[str]) -> None:
    if labels:
        backend.set_labels(name, _labels(labels))


def check_labels(labels: list[str]) -> None:
    """Refuse bad ``--label`` values before anything is written (:class:`BadLabel`)."""
    _labels(labels)


# -- rollout ----------------------------------------------------------------------------------
def _signed_bundle(backend: Backend, settings: Settings, version: int) -> Any:
    """The signing key rollback bundles are signed with, once the bundle ``version`` is
    stored and signed by one of the fleet's keys (:class:`RolloutRefused` otherwise)."""
    from ._bundle_cli import load_signing_keys

    bundle = backend.get_bundle(version)
    if bundle is None:
        raise RolloutRefused(f"no bundle version {version} ('edgepipe-cloud bundle list')")
    keys, source, _ = load_signing_keys(settings)
    trusted = {k.public.id: k.public for k in keys}
    try:
        verify(
            bundle["manifest"],
            bundle["signature"],
            bundle["key_id"],
            trusted=trusted,
            now_ms=now_ms(),
            fleet=settings.fleet,
        )
    except BundleRefused as e:
        raise RolloutRefused(
            f"bundle {version} is not signed by a signing key of this fleet ({source}): "
            f"{e.reason}: {e.detail}"
        ) from None
    return keys[-1]


def _sign_rollbacks(
    backend: Backend, settings: Settings, key: Any, rid: int, devices: list[str]
) -> dict[str, int]:
    """For each bundle the devices run now, its chain signed again as a new (urgent)
    version, and a local bundle when some run no bundle (their configured chain): what the
    receiver desires for a device whose gate fails (it holds no signing key itself).
    -> {previous version or ``local``: rollback version}."""
    from ._bundle_cli import create_local_bundle, reissue_bundle

    states = [backend.bundle_state(d) for d in devices]
    running = sorted({st["active_version"] for st in states if st and st["active_version"]})
    out = {}
    if any(not st or not st["active_version"] for st in states):
        made = create_local_bundle(
            backend, key, fleet=settings.fleet, priority="urgent", valid_days=ROLLBACK_VALID_DAYS
        )
        out["local"] = int(made["version"])
        backend.rollout_event(
            rid, "rollback_bundle", f"bundle {made['version']} signed with {made['key_id']}: "
            "a local bundle (back to the device's configured chain), urgent, for a rollback "
            "of the devices that run no bundle", now=now_ms(),
        )  # fmt: skip
    for prev in running:
        made = reissue_bundle(
            backend, key, prev, fleet=settings.fleet, priority="urgent",
            valid_days=ROLLBACK_VALID_DAYS,
        )  # fmt: skip
        out[str(prev)] = int(made["version"])
        backend.rollout_event(
            rid, "rollback_bundle", f"bundle {made['version']} signed with {made['key_id']}: "
            f"the chain of bundle {prev}, urgent, for a rollback", now=now_ms(),
        )  # fmt: skip
    return out


def start(args: argparse.Namespace, settings: Settings, backend: Backend) -> int:
    try:
        key, value = parse_label(args.group)
    except BadLabel as e:
        raise RolloutRefused(f"--group {e.why}") from None
    try:
        spec = dict(DEFAULT_SPEC)
        spec.update(canary=args.canary, wave=args.wave, policy=args.policy)
        spec["soak_ms"] = parse_duration(args.soak)
        for k in ("max_drop_increase", "max_dead_letter_increase"):
            v = getattr(args, k)
            if not 0 <= v <= 1:
                raise ValueError(f"--{k.replace('_', '-')} is a rate between 0 and 1")
            spec[k] = v
        if args.min_readings < 0:
            raise ValueError("--min-readings must be >= 0")
        spec["min_readings"] = args.min_readings
        devices = backend.devices_labelled(key, value)
        waves = plan_waves(devices, args.canary, args.wave)
    except ValueError as e:
        raise RolloutRefused(str(e)) from None
    if not devices:
        raise RolloutRefused(
            f"no device has label {key}={value} ('edgepipe-cloud devices label NAME {key}={value}')"
        )
    signing_key = _signed_bundle(backend, settings, args.bundle)
    rid = backend.create_rollout(args.bundle, (key, value), spec, waves, now=now_ms())
    try:
        spec["rollbacks"] = _sign_rollbacks(backend, settings, signing_key, rid, devices)
    except BaseException:
        backend.update_rollout(rid, now=now_ms(), state="aborted", reason="start failed")
        raise
    backend.update_rollout(rid, now=now_ms(), spec=spec)
    _engine(settings, backend).evaluate({devices[0]})  # the canary wave
    print(
        json.dumps({"rollout": rid, "rollbacks": spec["rollbacks"], "waves": waves}, sort_keys=True)
    )
    print(
        f"rollout {rid} started: bundle {args.bundle} to {len(devices)} device(s) with "
        f"{key}={value}, canary {', '.join(waves[0])}; the receiver carries it on "
        f"('edgepipe-cloud rollout status {rid}')",
        file=sys.stderr,
    )
    return 0


def _engine(settings: Settings, backend: Backend) -> RolloutEngine:
    from core._clock import SYSTEM_CLOCK

    from ._rollout_api import engine

    return engine(backend, settings, SYSTEM_CLOCK)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def print_status(ro: dict[str, Any], events: list[dict[str, Any]], out: Any = sys.stdout) -> None:
    """The human timeline of one rollout."""
    s = ro["spec"]
    w = ro["current_wave"]
    wave = "-" if w < 0 else ("canary" if w == 0 else f"wave {w}")
    print(
        f"rollout {ro['id']}: bundle {ro['bundle_version']} to {ro['group']} -- {ro['state']}"
        + (f" ({ro['reason']})" if ro["reason"] else ""),
        file=out,
    )
    print(
        f"  canary {s['canary']}, waves of {s['wave']}, soak {s['soak_ms'] / 1000:g} s, policy "
        f"{s['policy']}, gate: drop rate +{s['max_drop_increase']:.1%}, dead letters "
        f"+{s['max_dead_letter_increase']:.1%}; now at {wave} of {ro['waves']}",
        file=out,
    )
    for i in range(ro["waves"]):
        print(f"  {'canary' if i == 0 else f'wave {i}'}:", file=out)
        for d in (d for d in ro["devices"] if d["wave"] == i):
            reason = f"  {d['reason']}" if d["reason"] else ""
            print(f"    {d['device']:<20} {d['state']:<13}{reason}".rstrip(), file=out)
    print("  timeline:", file=out)
    for e in events:
        who = f" {e['device']}" if e["device"] else ""
        print(f"    {_when(e['ts_ms'])} {e['kind']:<17}{who}: {e['detail']}", file=out)


def rollout_command(args: argparse.Namespace, settings: Settings, backend: Backend) -> int:
    if args.action == "start":
        return start(args, settings, backend)
    if args.action == "list":
        for r in backend.list_rollouts():
            print(json.dumps(r, sort_keys=True))
        return 0
    if args.action == "status":
        rid = args.id
        if rid is None:
            rows = backend.list_rollouts(limit=1)
            if not rows:
                raise RolloutRefused("no rollout yet")
            rid = rows[0]["id"]
        ro = backend.rollout(rid)
        if ro is None:
            raise UnknownRollout(rid)
        events = backend.rollout_events(rid)
        if args.json:
            print(json.dumps({**ro, "events": events}, sort_keys=True))
        else:
            print_status(ro, events)
        return 0
    try:
        ro = _engine(settings, backend).act(args.id, args.action, "cli")
    except ValueError as e:
        raise RolloutRefused(str(e)) from None
    print(f"rollout {args.id} is {ro['state']}", file=sys.stderr)
    return 0


ERRORS = (RolloutRefused, RolloutConflict, UnknownRollout, BadLabel)


def add_label_parsers(
    dsub: Any, add: Any, command: Any, exits: Any, db_cmd: str, no_db: str
) -> None:
    add.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label of the device (repeat for more); rollouts pick devices by label",
    )
    lab = command(
        dsub,
        "label",
        "set (KEY=VALUE) or remove (--remove KEY) labels of a device; prints them",
        exits(f"no such device, a bad label, more than 32 labels; {db_cmd}", no_db),
    )
    lab.add_argument("name")
    lab.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    lab.add_argument("--remove", action="append", default=[], metavar="KEY")


def add_rollout_parser(sub: Any, command: Any, exits: Any, db_cmd: str, no_db: str) -> None:
    ro = command(
        sub, "rollout", "staged rollouts of a bundle to a labelled group", exits(db_cmd, no_db)
    )
    rsub = ro.add_subparsers(dest="action", required=True, metavar="ACTION")
    st = command(
        rsub,
        "start",
        "roll a bundle out to the devices of a group, canary first, then in waves",
        exits(
            "the bundle is unknown or not signed by the fleet, no device is in the group, or "
            f"an active rollout has some of its devices; {db_cmd}",
            no_db + ", no signing key",
        ),
    )
    st.add_argument("bundle", type=int, metavar="BUNDLE", help="the bundle version")
    st.add_argument("--group", required=True, metavar="LABEL=VALUE")
    st.add_argument("--canary", default=DEFAULT_SPEC["canary"], help="N devices or P%% (default 1)")
    st.add_argument(
        "--wave", default=DEFAULT_SPEC["wave"], help="each later wave: N or P%% (default 25%%)"
    )
    st.add_argument("--soak", default="30m", help="how long a wave's gate must hold (default 30m)")
    st.add_argument(
        "--policy",
        choices=["device", "all"],
        default="device",
        help="on a failed gate roll back the failing device(s) or every device that got it",
    )
    st.add_argument("--max-drop-increase", type=float, default=DEFAULT_SPEC["max_drop_increase"],
                    help="drop rate allowed above the device's own before the change (default 0.05)")  # fmt: skip
    st.add_argument("--max-dead-letter-increase", type=float,
                    default=DEFAULT_SPEC["max_dead_letter_increase"],
                    help="dead-letter rate allowed above the device's own (default 0.01)")  # fmt: skip
    st.add_argument("--min-readings", type=int, default=0,
                    help="readings a device must have processed before it counts healthy")  # fmt: skip
    st.add_argument(
        "--signing-key-file",
        metavar="FILE",
        help="the fleet's signing key file (the bundle must be signed by one of its keys); "
        "else $EDGEPIPE_CLOUD_SIGNING_KEY_FILE",
    )
    status = command(
        rsub, "status", "a rollout's waves, devices and timeline", exits(db_cmd, no_db)
    )
    status.add_argument("id", type=int, nargs="?", help="default: the newest rollout")
    status.add_argument("--json", action="store_true", help="one JSON object")
    command(rsub, "list", "rollouts, newest first (JSON lines)", exits(db_cmd, no_db))
    for action, what in (
        ("pause", "no new wave starts (gates are still watched)"),
        ("resume", "carry on with the next wave"),
        ("abort", "stop: devices not yet updated keep what they run"),
    ):
        p = command(
            rsub, action, what, exits(f"the rollout is not in a state for it; {db_cmd}", no_db)
        )
        p.add_argument("id", type=int)
