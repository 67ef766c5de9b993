"""``edgepipe sync --now``: drain the backlog with a progress bar, exit 0 when drained."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from pipeline._errors import ConfigError, SyncError

__all__ = ["Progress", "drain_now"]


class Progress:
    """A progress bar on stderr when it is a terminal, else a line every few seconds."""

    def __init__(self, total: int, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.total = max(total, 0)
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.t0 = self._last = time.monotonic()
        self.done = 0

    def __call__(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.quiet or (self.total == 0 and done == 0):
            return
        if not self.tty and now - self._last < 5 and done < self.total:
            return
        if self.tty and now - self._last < 0.1 and done < self.total:
            return
        self._last = now
        rate = done / max(now - self.t0, 1e-6)
        frac = min(1.0, done / self.total) if self.total else 1.0
        if self.tty:
            bar = "#" * int(frac * 30)
            self.stream.write(
                f"\r[{bar:<30}] {frac:6.1%} {done:,}/{self.total:,} readings {rate:,.0f}/s "
            )
        else:
            self.stream.write(f"synced {done:,}/{self.total:,} readings ({rate:,.0f}/s)\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()


async def drain_now(cfg: Any, *, retry_for: float | None = None, quiet: bool = False) -> int:
    from storage import open_store

    from ._worker import SyncWorker

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    if cfg.sync.device_secret is None:
        raise ConfigError("sync.device_secret is not set (edgepipe-cloud devices add NAME)")
    try:
        secret = cfg.sync.device_secret.get()
    except LookupError as e:
        raise ConfigError(f"sync.device_secret: {e}") from None
    store = await open_store(cfg, create=False)
    try:
        from ._status import state_path_for

        worker = SyncWorker(
            store,
            cfg.sync,
            device_id=cfg.device.id,
            secret=secret,
            base_dir=cfg.base_dir,
            state_path=state_path_for(cfg),
        )
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
