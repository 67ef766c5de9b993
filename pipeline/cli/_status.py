"""``edgepipe status``: what the local store holds, as text or ``--json``.

The report is made of *sections*.  A section provider is an async function
``provider(ctx: StatusContext) -> dict | None`` (None: nothing to say); it is named in
:data:`SECTIONS` as ``"module:function"`` and imported only when ``status`` runs, so
another component adds a section with a one-line edit (e.g. the sync worker's backlog and
last upload), or at run time with :func:`add_section`.

Text rendering: keys ending in ``_bytes`` print as sizes, ``_ms`` as UTC times.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config._models import PipelineConfig
    from storage import Store

from . import add_config_arg

__all__ = ["SECTIONS", "StatusContext", "add_section", "collect"]


@dataclass
class StatusContext:
    """What a section provider gets: the loaded config and the open store (None when the
    store does not exist yet)."""

    cfg: PipelineConfig
    store: Store | None
    verify: bool = False


Provider = Callable[[StatusContext], Awaitable[dict[str, Any] | None]]

#: (section name, provider or "module:function"), in display order; filled in below.
SECTIONS: list[tuple[str, str | Provider]] = []


def add_section(name: str, provider: str | Provider) -> None:
    """Add (or replace) a section of the report."""
    for i, (n, _) in enumerate(SECTIONS):
        if n == name:
            SECTIONS[i] = (name, provider)
            return
    SECTIONS.append((name, provider))


def _resolve(p: str | Provider) -> Provider:
    if callable(p):
        return p
    mod, _, fn = p.partition(":")
    return getattr(importlib.import_module(mod), fn)


async def store_section(ctx: StatusContext) -> dict[str, Any]:
    from .. import _compose as compose

    if ctx.store is None:
        return {"path": str(compose.store_path(ctx.cfg)), "exists": False}
    s = await ctx.store.stats()
    out = {
        "path": str(ctx.store.path),
        "schema_version": s["schema_version"],
        "batches": s["batches"],
        "readings": s["readings"],
        "last_seq": s["last_seq"],
        "unsynced_batches": s["unsynced_batches"],
        "unsynced_readings": s["unsynced_readings"],
        "oldest_unsynced_ms": s["oldest_unsynced_ms"],
        "sync_cursor": s["sync_cursor"],
        "dead_letters": s["dead_letters"],
        "evicted_batches": s["evicted_batches"],
        "disk_bytes": s["disk_bytes"],
        "used_bytes": s["used_bytes"],
        "quota_bytes": s["quota_bytes"],
        "on_full": ctx.store.on_full,
    }
    if ctx.verify:
        out["verified_rows"] = sum((await ctx.store.verify()).values())
    return out


async def keys_section(ctx: StatusContext) -> dict[str, Any] | None:
    if ctx.store is None:
        return None
    s = await ctx.store.stats()
    from protocol._keys import KEY_REFUSE_AT

    ring = ctx.store.sealer.keyring
    return {
        "active_key_id": s["key_id"],
        "active_key_seals": s["key_seals"],
        "seal_limit": KEY_REFUSE_AT,  # writes stop there until `edgepipe keys rotate`
        "keyring_ids": ring.ids,
        "keyring_source": ring.source,
        "rows_by_key": await ctx.store.rows_by_key(),
    }


async def sync_section(ctx: StatusContext) -> dict[str, Any]:
    from sync import SyncState, status_report

    from .. import _compose as compose

    stats = await ctx.store.stats() if ctx.store is not None else None
    state = SyncState.load(compose.sync_state_path(ctx.cfg))
    return status_report(ctx.cfg.sync, state, stats)


SECTIONS += [("store", store_section), ("keys", keys_section), ("sync", sync_section)]


async def collect(cfg: PipelineConfig, *, verify: bool = False) -> dict[str, dict[str, Any]]:
    from .. import _compose as compose

    report: dict[str, dict[str, Any]] = {}
    store = None
    if compose.store_path(cfg).exists():
        store = await compose.open_store(cfg, create=False)
    try:
        ctx = StatusContext(cfg, store, verify)
        for name, p in SECTIONS:
            section = await _resolve(p)(ctx)
            if section is not None:
                report[name] = section
    finally:
        if store is not None:
            await store.close()
    return report


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="what the local store holds: backlog, size, keys")
    add_config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also check every row (integrity check, decryption, no missing batch)",
    )
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    import asyncio

    from config._loader import load_config

    cfg = load_config(args.config)
    report = asyncio.run(collect(cfg, verify=args.verify))
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report))
    return 0


def render(report: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, fields in report.items():
        lines.append(f"{name}:")
        labels = {k: k.removesuffix("_ms").replace("_", " ") for k in fields}
        width = max(map(len, labels.values()), default=0)
        for k, v in fields.items():
            lines.append(f"  {labels[k]:<{width}}  {_fmt(k, v)}")
    return "\n".join(lines) + "\n"


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key.endswith("_bytes") and isinstance(v, int | float):
        n = float(v)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024
    if key.endswith("_ms") and isinstance(v, int):
        from ._export import iso_ms

        return iso_ms(v)
    if isinstance(v, dict):
        return ", ".join(f"{k}: {x}" for k, x in v.items()) or "-"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return str(v)
