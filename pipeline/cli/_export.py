"""``edgepipe export``: readings from the encrypted store as JSON lines or CSV.

Times (``--since``, ``--until``) are ISO 8601 (``2026-05-01``, ``2026-05-01T12:00:00Z``),
Unix seconds or milliseconds, ``now``, or an age such as ``90s``, ``15m``, ``2h``, ``7d``
(that long ago).  The range is half-open: since <= ts < until.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from core._progress import Progress

from . import add_config_arg

__all__ = ["parse_time"]

_AGE = re.compile(r"^-?(\d+(?:\.\d+)?)(s|m|h|d|w)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: float | None = None) -> int:
    """-> milliseconds since the Unix epoch.  Raises ValueError with a clear message."""
    now = time.time() if now is None else now
    t = text.strip()
    if t == "now":
        return int(now * 1000)
    m = _AGE.match(t)
    if m:
        return int((now - float(m.group(1)) * _UNIT[m.group(2)]) * 1000)
    if re.fullmatch(r"\d+(\.\d+)?", t):
        v = float(t)
        return int(v if v >= 1e11 else v * 1000)  # >= 1e11: already milliseconds
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read time {text!r}: use ISO 8601 (2026-05-01T12:00:00Z), Unix seconds, "
            "'now' or an age like 15m, 2h, 7d"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export stored readings (decrypted) as JSON lines or CSV")
    add_config_arg(p)
    p.add_argument("--since", help="start of the range (inclusive)")
    p.add_argument("--until", help="end of the range (exclusive)")
    p.add_argument("--device", help="only this device")
    p.add_argument("--metric", help="only this metric")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--progress", action="store_true", help="progress on stderr even if no tty")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    import asyncio

    from config._loader import load_config
    from core._errors import ConfigError

    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as e:
        raise ConfigError(str(e), path="--since/--until") from None
    cfg = load_config(args.config)
    if args.output:
        with open(args.output, "w", newline="") as out:
            n = asyncio.run(_write(cfg, args, since, until, out))
    else:
        n = asyncio.run(_write(cfg, args, since, until, sys.stdout))
    if args.output:
        print(f"exported {n} reading(s) to {args.output}", file=sys.stderr)
    return 0


async def _write(cfg: Any, args: argparse.Namespace, since: Any, until: Any, out: TextIO) -> int:
    import csv
    import json

    from .._compose import open_store

    n = 0
    async with await open_store(cfg, create=False) as store:
        bar = Progress(
            await store.count(since, until),
            quiet=not (args.progress or sys.stderr.isatty()),
            bar=True,
            label="exporting",
            verb="exported",
        )
        readings = store.query(
            device=args.device,
            metric=args.metric,
            since_ms=since,
            until_ms=until,
            progress=bar,
        )
        if args.format == "csv":
            w = csv.writer(out)
            w.writerow(["device", "metric", "ts", "time", "value", "flags", "tags"])
            async for r in readings:
                tags = json.dumps(r.tags, sort_keys=True) if r.tags else ""
                w.writerow([r.device, r.metric, r.ts, iso_ms(r.ts), repr(r.value), r.flags, tags])
                n += 1
        else:
            async for r in readings:
                row: dict[str, Any] = {
                    "device": r.device,
                    "metric": r.metric,
                    "ts": r.ts,
                    "time": iso_ms(r.ts),
                    "value": r.value,
                }
                if r.tags:
                    row["tags"] = r.tags
                if r.flags:
                    row["flags"] = r.flags
                out.write(json.dumps(row) + "\n")
                n += 1
        bar.finish()
    return n
