"""Benchmark of the encrypted local store, side by side with plaintext rows.

    python -m bench.store [--batches 300] [--size 500] [--rounds 5] [--quick]

In one run, in temporary directories on the same filesystem, the same batches (``size``
readings each, one message identity per reading, a filter-state snapshot per commit, as
the runtime commits them) are written through :class:`storage.Store`:

* ``encrypted FULL``   -- what edgepipe does (AES-256-GCM rows, synchronous=FULL);
* ``plaintext FULL``   -- the same code path with sealing replaced by the identity, the
  same sync level: the difference is the cost of encryption;
* ``encrypted NORMAL`` -- synchronous=NORMAL: the difference is the cost of FULL's extra
  fsync per commit (NORMAL may lose the last commits, already acknowledged, on power loss).

Per variant: commits/s and readings/s; bytes written per reading as SQLite passed them to
write(2) on its worker thread (WAL frames + checkpoints: the flash-wear figure, also the
``edgepipe_store_bytes_written_total`` metric), the block-layer ``write_bytes`` of
/proc/self/io when the kernel accounts it, and bytes on disk per reading after a final
checkpoint.  Prints a table and writes bench/results/store.json.  Measurements only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from core._model import Batch
from storage import Keyring, Store, generate_key_line

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


class _PlainSealer:
    """Sealing replaced by the identity: plaintext rows through the same code path."""

    def __init__(self, real: Any) -> None:
        self.keyring, self.device = real.keyring, real.device

    def seal(self, table: str, row: int | str, plaintext: bytes) -> tuple[str, bytes]:
        return self.keyring.active_id, plaintext

    def open(self, table: str, row: int | str, key_id: str, blob: bytes) -> bytes:
        return blob


def _make_batches(n_batches: int, size: int, store: Store) -> list[tuple[Batch, list[bytes]]]:
    rnd = random.Random(1)
    sids = [store.registry.intern(f"sensor-{d:03d}", m) for d in range(50) for m in ("t", "h")]
    out = []
    t0 = 1_700_000_000_000
    for i in range(n_batches):
        b = Batch()
        for j in range(size):
            b.append(t0 + (i * size + j) * 10, round(rnd.gauss(21, 3), 2), rnd.choice(sids))
        out.append((b, [rnd.randbytes(16) for _ in range(size)]))
    return out


def _block_writes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


async def _variant(name: str, plain: bool, sync: str, n: int, size: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("EDGEPIPE_BENCH_DIR")) as d:
        db = Path(d) / "store.db"
        kr = Keyring.parse(generate_key_line("k1"), "bench")
        store = await Store.open(db, kr, device_id="bench-device", synchronous=sync)
        sealing = [0.0]
        if plain:
            store.sealer = _PlainSealer(store.sealer)  # type: ignore[assignment]
        else:  # time spent in AES-GCM itself, inside the commits
            real_seal = store.sealer.seal

            def timed_seal(*a: Any) -> tuple[str, bytes]:
                t = time.perf_counter()
                try:
                    return real_seal(*a)
                finally:
                    sealing[0] += time.perf_counter() - t

            store.sealer.seal = timed_seal  # type: ignore[method-assign]
        batches = _make_batches(n, size, store)
        state = {"smooth": os.urandom(256), "spike": os.urandom(64)}
        await store.commit(*batches[0][:1], (), batches[0][1], state)  # series rows, warm-up
        sealing[0] = 0.0
        w0, blk0 = store.bytes_written, _block_writes()
        t0, c0 = time.perf_counter(), time.process_time()
        for b, keys in batches[1:]:
            await store.commit(b, (), keys, state)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        w1, blk1 = store.bytes_written, _block_writes()
        readings = (n - 1) * size
        await store.checkpoint()
        disk = store.disk_bytes()
        await store.close()
    return {
        "variant": name,
        "synchronous": sync,
        "encrypted": not plain,
        "batches": n - 1,
        "batch_size": size,
        "seconds": round(dt, 3),
        "commits_per_s": round((n - 1) / dt, 1),
        "readings_per_s": round(readings / dt),
        "cpu_us_per_commit": round(cpu / (n - 1) * 1e6, 1),
        "seal_us_per_commit": round(sealing[0] / (n - 1) * 1e6, 1),
        "seal_share_of_commit_pct": round(sealing[0] / dt * 100, 2),
        "bytes_written_per_reading": round((w1 - w0) / readings, 1),
        "block_write_bytes_per_reading": (
            round((blk1 - blk0) / readings, 1) if blk0 is not None and blk1 is not None else None
        ),
        "disk_bytes_per_reading": round(disk / (n * size), 1),
    }


def _seal_cost(size: int) -> dict[str, float]:
    """CPU time of sealing one batch alone (AES-GCM of its msgpack)."""
    import msgpack

    from storage import Sealer

    s = Sealer(Keyring.parse(generate_key_line("k1"), "b"), "bench-device")
    rnd = random.Random(2)
    plain = msgpack.packb(
        [[rnd.randrange(100)] * size, list(range(size)), [rnd.random()] * size, [0] * size]
    )
    t0 = time.perf_counter()
    for i in range(2000):
        s.seal("batches", i, plain)
    return {"seal_us_per_batch": round((time.perf_counter() - t0) / 2000 * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--size", type=int, default=500, help="readings (and messages) per batch")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved runs per variant")
    ap.add_argument("--quick", action="store_true", help="60 batches, 1 round")
    args = ap.parse_args(argv)
    n = 60 if args.quick else args.batches
    if args.quick:
        args.rounds = 1
    variants = (
        ("encrypted FULL", False, "FULL"),
        ("plaintext FULL", True, "FULL"),
        ("encrypted NORMAL", False, "NORMAL"),
    )
    # fsync times drift: interleave the variants over rounds and keep each one's median run
    runs: dict[str, list[dict[str, Any]]] = {v[0]: [] for v in variants}
    for _ in range(args.rounds):
        for name, plain, sync in variants:
            runs[name].append(asyncio.run(_variant(name, plain, sync, n + 1, args.size)))
    rows = [
        sorted(rs, key=lambda r: r["readings_per_s"])[len(rs) // 2] | {"rounds": len(rs)}
        for rs in runs.values()
    ]
    enc, pla, nor = rows
    summary = {
        # the direct figure: time inside AES-GCM as a share of the encrypted commits' time
        "encryption_share_of_commit_pct": enc["seal_share_of_commit_pct"],
        # whole-run comparisons: fsync latency on a shared disk swamps a few microseconds
        "encryption_cpu_cost_pct": round(
            (enc["cpu_us_per_commit"] / pla["cpu_us_per_commit"] - 1) * 100, 1
        ),
        "encryption_wall_cost_pct": round(
            (1 - enc["readings_per_s"] / pla["readings_per_s"]) * 100, 1
        ),
        "full_vs_normal_cost_pct": round(
            (1 - enc["readings_per_s"] / nor["readings_per_s"]) * 100, 1
        ),
        "encryption_bytes_overhead_per_reading": round(
            enc["bytes_written_per_reading"] - pla["bytes_written_per_reading"], 1
        ),
        **_seal_cost(args.size),
    }
    cols = [
        ("variant", 18),
        ("commits_per_s", 10),
        ("readings_per_s", 10),
        ("cpu_us_per_commit", 9),
        ("bytes_written_per_reading", 12),
        ("block_write_bytes_per_reading", 12),
        ("disk_bytes_per_reading", 10),
    ]
    heads = [
        "variant",
        "commits/s",
        "readings/s",
        "CPU us/c",
        "B written/r",
        "B block/r",
        "B disk/r",
    ]
    print(
        " ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, (_, w)) in enumerate(zip(heads, cols, strict=True))
        )
    )
    for r in rows:
        print(" ".join(
            str(r[k] if r[k] is not None else "-").rjust(w) if i else str(r[k]).ljust(w)
            for i, (k, w) in enumerate(cols)
        ))  # fmt: skip
    print(
        f"\nencryption is {summary['encryption_share_of_commit_pct']}% of commit time "
        f"({enc['seal_us_per_commit']} us sealing per commit; whole-run difference against "
        f"plaintext: {summary['encryption_wall_cost_pct']}% wall, "
        f"{summary['encryption_cpu_cost_pct']}% CPU, i.e. fsync noise), "
        f"+{summary['encryption_bytes_overhead_per_reading']} B written per reading; "
        f"FULL costs {summary['full_vs_normal_cost_pct']}% against NORMAL"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "batches": n,
        "batch_size": args.size,
        "filesystem_dir": os.environ.get("EDGEPIPE_BENCH_DIR") or tempfile.gettempdir(),
        "variants": rows,
        "summary": summary,
    }
    (RESULTS / "store.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'store.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
