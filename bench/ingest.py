"""Decode + validate cost per message (no broker, no store): the ingest hot path alone.

    python -m bench.ingest [--data data/airquality-uci.csv] [--repeat 3]

Real readings from the UCI air-quality data set (9,357 hourly rows, 13 metrics) are turned
into MQTT messages in each payload format -- one metric per message (number, JSON single),
all metrics of a row per message (JSON multi, MessagePack, SenML) -- and run through
:class:`pipeline.ingest._decoder.Decoder` exactly as the runtime does (routing, parsing, timestamp
and type validation, series interning, columnar batch, QoS 1 message identity).  Prints
microseconds per message and per reading; writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import msgpack

from config._models import SubscriptionConfig
from core._model import SeriesRegistry
from devtools import _dataset as dataset
from pipeline.ingest._decoder import Decoder
from pipeline.ingest._mqtt import Message

REPO = Path(__file__).resolve().parents[1]
DATA = dataset.FULL


def load(path: Path) -> list[tuple[int, dict[str, float]]]:
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            try:
                t = datetime.strptime(f"{r['Date']} {r['Time']}", "%d/%m/%Y %H:%M:%S")
            except (KeyError, ValueError):
                continue
            vals = {}
            for k, v in r.items():
                if k in ("Date", "Time") or v in (None, ""):
                    continue
                try:
                    vals[k] = float(v)
                except ValueError:
                    continue
            rows.append((int(t.replace(tzinfo=UTC).timestamp()), vals))
    return rows


def messages(rows: list[tuple[int, dict[str, float]]], fmt: str) -> list[Message]:
    out: list[Message] = []
    arrival = int(time.time() * 1000)

    def add(topic: str, payload: bytes) -> None:
        out.append(Message(topic, payload, 1, len(out) % 65535 + 1, False, arrival, 1))

    for i, (ts, vals) in enumerate(rows):
        dev = f"station{i % 4}"
        if fmt == "number":
            for k, v in vals.items():
                add(f"aq/{dev}/{k}", repr(v).encode())
        elif fmt == "json-single":
            for k, v in vals.items():
                add(f"aq/{dev}/{k}", json.dumps({"ts": ts, "value": v, "seq": i}).encode())
        elif fmt == "json-multi":
            add(f"aq/{dev}/all", json.dumps({"ts": ts, "seq": i, **vals}).encode())
        elif fmt == "msgpack":
            add(f"aq/{dev}/all", msgpack.packb({"ts": ts, "seq": i, **vals}))
        elif fmt == "senml":
            recs = [{"bn": f"{dev}:", "bt": ts}] + [{"n": k, "v": v} for k, v in vals.items()]
            add(f"aq/{dev}/all", json.dumps(recs).encode())
    return out


FORMATS = {
    "number": "number",
    "json-single": "json",
    "json-multi": "json",
    "msgpack": "msgpack",
    "senml": "senml",
}


def bench(rows: list, name: str, repeat: int, batch: int = 500) -> dict[str, float]:
    msgs = messages(rows, name)
    sub = SubscriptionConfig(topic="aq/{device}/{metric}", format=FORMATS[name])
    best = float("inf")
    readings = 0
    for _ in range(repeat):
        dec = Decoder(
            [sub], SeriesRegistry(), device_id="bench", max_payload=65536, identity_key=b"k" * 32
        )
        t0 = time.perf_counter()
        readings = 0
        for i in range(0, len(msgs), batch):
            chunk = msgs[i : i + batch]
            d = dec.decode(chunk, dec.dup_identities(chunk) and set())
            readings += len(d.batch)
            assert not d.dead_letters, d.dead_letters[:1]
        best = min(best, time.perf_counter() - t0)
    return {
        "messages": len(msgs),
        "readings": readings,
        "us_per_message": best / len(msgs) * 1e6,
        "us_per_reading": best / readings * 1e6,
        "messages_per_s": len(msgs) / best,
        "mean_payload_bytes": sum(len(m.payload) for m in msgs) / len(msgs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    args = ap.parse_args(argv)
    rows = load(args.data)
    results = {name: bench(rows, name, args.repeat) for name in FORMATS}
    print(f"decode + validate, {len(rows):,} rows of {args.data.name} (best of {args.repeat})")
    print(
        f"{'format':<12} {'messages':>9} {'bytes':>6} {'us/msg':>7} {'us/reading':>10} {'msg/s':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<12} {r['messages']:>9,} {r['mean_payload_bytes']:>6.0f} "
            f"{r['us_per_message']:>7.2f} {r['us_per_reading']:>10.2f} {r['messages_per_s']:>10,.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
