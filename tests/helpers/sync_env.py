"""Shared pieces of the sync tests: a real receiver process (``edgepipe-cloud serve``), an
edge store filled fast, a pipeline.yaml for ``edgepipe sync``, and counts at both ends."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cloud._local import LocalReceiver
from config._models import Secret, SyncConfig
from core._metrics import METRICS
from core._model import Batch
from storage import Keyring, Store, generate_key_line
from sync._state import SyncState
from tests.helpers.edge import REPO, wait_for

wait_until = wait_for  # the sync tests' name for it
BASE_TS = 1_700_000_000_000


class Receiver(LocalReceiver):
    """``edgepipe-cloud serve`` on a free loopback port with a SQLite database, plus
    queries of what arrived."""

    def __init__(
        self,
        tmp: Path,
        *,
        extra: list[str] | None = None,
        port: int | None = None,
        ca: Path | None = None,
    ):
        self.tmp = tmp
        self.db_path = tmp / "cloud.db"
        super().__init__(
            f"sqlite:///{self.db_path}",
            log=tmp / "receiver.log",
            port=port,
            extra=extra,
            ca=ca,
            cwd=REPO,
        )

    # -- what arrived ----------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """readings stored, distinct readings (each test value is unique), batches."""
        if not self.db_path.exists():
            return {"readings": 0, "distinct": 0, "batches": 0, "rejections": 0}
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            r, d = con.execute("SELECT count(*), count(DISTINCT val) FROM readings").fetchone()
            b = con.execute("SELECT count(*) FROM batches").fetchone()[0]
            rej = con.execute("SELECT count(*) FROM rejections").fetchone()[0]
        finally:
            con.close()
        return {"readings": r, "distinct": d, "batches": b, "rejections": rej}

    def batch_seqs_in_arrival_order(self) -> list[int]:
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return [r[0] for r in con.execute("SELECT seq FROM batches ORDER BY rowid")]
        finally:
            con.close()

    def rejection_reasons(self) -> list[str]:
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return [r[0] for r in con.execute("SELECT reason FROM rejections ORDER BY rowid")]
        finally:
            con.close()

    def device_row(self, name: str) -> dict[str, Any]:
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        con.row_factory = sqlite3.Row
        try:
            return dict(con.execute("SELECT * FROM devices WHERE name = ?", (name,)).fetchone())
        finally:
            con.close()


# -- the edge side ------------------------------------------------------------------------------
def new_keyfile(tmp: Path) -> Path:
    p = tmp / "store.key"
    p.write_text(generate_key_line() + "\n")
    p.chmod(0o600)
    return p


async def open_store(tmp: Path, device: str = "edge-1", synchronous: str = "FULL") -> Store:
    keyfile = tmp / "store.key"
    if not keyfile.exists():
        new_keyfile(tmp)
    keyring = Keyring.from_secret(Secret(file=keyfile))
    return await Store.open(tmp / "store.db", keyring, device_id=device, synchronous=synchronous)


async def fill(
    store: Store,
    batches: int,
    per_batch: int,
    *,
    start_value: int = 0,
    ts0: int = BASE_TS,
    flagged: Callable[[int], bool] = lambda b: False,
    series: int = 4,
) -> int:
    """Commit ``batches`` batches of ``per_batch`` readings; every value is unique (a running
    counter), so the receiver can count duplicates.  Returns the next free value."""
    sids = [store.registry.intern(f"sensor-{i}", "pm25", {"site": "a"}) for i in range(series)]
    v = start_value
    for b in range(batches):
        n = per_batch
        ts = [ts0 + (v + i) * 1000 for i in range(n)]
        vals = [float(v + i) for i in range(n)]
        sid = [sids[(v + i) % series] for i in range(n)]
        flags = [1 if (flagged(b) and i == 0) else 0 for i in range(n)]
        await store.commit(Batch(ts, vals, sid, flags))
        v += n
    return v


def fill_sync(tmp: Path, batches: int, per_batch: int, **kw: Any) -> int:
    async def go() -> int:
        store = await open_store(tmp, synchronous="NORMAL")
        try:
            return await fill(store, batches, per_batch, **kw)
        finally:
            await store.close()

    return asyncio.run(go())


def unsynced(tmp: Path) -> tuple[int, int]:
    con = sqlite3.connect(f"file:{tmp / 'store.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(
            "SELECT count(*), coalesce(sum(n), 0) FROM batches WHERE synced=0"
        ).fetchone()
    finally:
        con.close()


def sync_count(name: str, **labels: str) -> float:
    """A counter of the sync worker running in this process (``WorkerThread``), e.g.
    ``sync_count("edgepipe_sync_probes_total", result="failed")``; the registry is
    process-wide, so tests compare against a value read before the event."""
    return METRICS.value(name, **labels)


def sync_state(tmp: Path) -> SyncState:
    """The worker's persisted state (what ``edgepipe status`` reads), from any process."""
    return SyncState.load(tmp / "store.db.sync.json")


def sync_cfg(url: str, secret: str, **kw: Any) -> SyncConfig:
    d: dict[str, Any] = {
        "url": url,
        "device_secret": secret,
        "backoff_min_s": 0.2,
        "backoff_max_s": 2.0,
        "interval_s": 0.2,
        "timeout_s": 5.0,
    }
    d.update(kw)
    return SyncConfig.model_validate(d)


def edge_sync(url: str, secret: str, **kw: Any) -> dict[str, Any]:
    """The ``sync`` section of a pipeline.yaml (``tests.helpers.edge.make_config``) for an
    edge that uploads to ``url`` at once and retries fast."""
    return {
        "enabled": True,
        "url": url,
        "device_secret": secret,
        "interval_s": 0.2,
        "backoff_min_s": 0.2,
        "backoff_max_s": 1.0,
        **kw,
    }


def write_pipeline(tmp: Path, url: str, secret: str, device: str = "edge-1", **sync: Any) -> Path:
    (tmp / "device.secret").write_text(secret + "\n")
    (tmp / "device.secret").chmod(0o600)
    s: dict[str, Any] = {
        "url": url,
        "device_secret": {"file": str(tmp / "device.secret")},
        "backoff_min_s": 0.2,
        "backoff_max_s": 2.0,
        "timeout_s": 10.0,
    }
    s.update(sync)
    cfg = {
        "device": {"id": device},
        "subscriptions": [{"topic": "sensors/{device}/{metric}"}],
        "store": {"path": str(tmp / "store.db"), "key": {"file": str(tmp / "store.key")}},
        "sync": s,
        "metrics": {"listen": None},
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def make_worker(store: Store, cfg: SyncConfig, device: str, **kw: Any) -> Any:
    """A sync worker over ``store`` as the composition root builds one (``kw``: link, clock)."""
    from pipeline._compose import make_sync_worker

    secret = cfg.device_secret.get() if cfg.device_secret is not None else None
    return make_sync_worker(
        cfg, store, device_id=device, secret=secret, base_dir=Path(store.path).parent, **kw
    )


class WorkerThread:
    """``SyncWorker.run`` on its own event loop in a thread, as ``edgepipe run`` runs it."""

    def __init__(self, tmp: Path, cfg: SyncConfig, device: str = "edge-1", **kw: Any) -> None:
        self.tmp, self.cfg, self.device, self.kw = tmp, cfg, device, kw
        self.error: BaseException | None = None
        self.worker: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # surfaced by stop()
            self.error = e
        finally:
            self._ready.set()

    async def _run(self) -> None:
        store = await open_store(self.tmp, self.device)
        try:
            self.worker = make_worker(store, self.cfg, self.device, **self.kw)
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self.worker.run(self._stop)
        finally:
            if self.worker is not None:
                self.worker.close()
            await store.close()

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        self._ready.wait(30)
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the sync worker did not stop"
        if self.error:
            raise self.error


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sample_rss(proc: subprocess.Popen[bytes], every: float = 0.1) -> list[int]:
    """RSS (kB) of ``proc`` until it exits."""
    samples = []
    while proc.poll() is None:
        try:
            samples.append(rss_kb(proc.pid))
        except (OSError, ValueError):
            break
        time.sleep(every)  # the sampling period of the measurement, not synchronisation
    return samples


def edgepipe(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )
