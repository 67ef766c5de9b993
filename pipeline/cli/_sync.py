from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from core._errors import ConfigError, SyncError
from core._progress import Progress

from . import add_config_arg

if TYPE_CHECKING:
    from config._models import PipelineConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sync",
        help="upload the backlog to the cloud receiver now (exit 0 when drained)",
        description="Upload every unsynced batch to the receiver in sync.url, oldest first. "
        "Exit 0 when the backlog is drained, 1 when the receiver is unreachable or refuses, "
        "or when data must wait (metered link policy, budget).",
    )
    add_config_arg(p)
    p.add_argument("--now", action="store_true", help="drain now (the only mode; for clarity)")
    p.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep retrying (backoff, link watching) until SECONDS pass without progress",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(func=_sync)


def _sync(args: argparse.Namespace) -> int:
    import asyncio

    from config._loader import load_config

    cfg = load_config(args.config)

    return asyncio.run(drain_now(cfg, retry_for=args.wait, quiet=args.quiet))


async def drain_now(
    cfg: PipelineConfig, *, retry_for: float | None = None, quiet: bool = False
) -> int:
    from .. import _compose as compose

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    if cfg.sync.device_secret is None:
        raise ConfigError("sync.device_secret is not set (edgepipe-cloud devices add NAME)")
    try:
        secret = cfg.sync.device_secret.get()
    except LookupError as e:
        raise ConfigError(f"sync.device_secret: {e}") from None
    store = await compose.open_store(cfg, create=False)
    try:
        worker = compose.sync_worker(cfg, store, secret=secret)
        try:
            stats = await store.stats()
            progress = Progress(stats["unsynced_readings"], quiet=quiet)
            try:
                sent = await worker.drain(progress, retry_for=retry_for)
            except SyncError as e:
                progress.finish()
                print(f"edgepipe: sync failed: {e}", file=sys.stderr)
                return 1
            progress(sent)
            progress.finish()
            left = await store.stats()
            if left["unsynced_batches"]:
                why = worker.status.waiting or "the receiver did not acknowledge them"
                print(
                    f"edgepipe: {left['unsynced_readings']:,} readings in "
                    f"{left['unsynced_batches']:,} batches not sent: {why}",
                    file=sys.stderr,
                )
                return 1
            if not quiet:
                print(f"edgepipe: backlog drained ({sent:,} readings sent)", file=sys.stderr)
            return 0
        finally:
            worker.close()
    finally:
        await store.close()
