"""Coverage-guided fuzzing of the MQTT payload decoders (``pipeline.ingest._codecs``:
auto, JSON, MessagePack, SenML, number).

Only a :class:`core._errors.DecodeError` with a reason may escape; every reading decoded
has a timestamp in 2000..2100 (at most 24 h after arrival), a finite value within
+-1e250 and string names, and the readings decode to the same readings when sent again as
JSON and as MessagePack.  Run from the repository root (docs/security.md, "Fuzzing")::

    python fuzz/codecs.py -runs=20000 CORPUS_DIR fuzz/corpus/codecs
"""

from __future__ import annotations

import json
import math
import sys

import atheris
import msgpack

with atheris.instrument_imports(include=["pipeline.ingest", "config"]):
    from config._models import SubscriptionConfig
    from core._errors import DecodeError
    from pipeline.ingest._codecs import decode_payload

ARRIVAL = 1_700_000_000_000
FORMATS = ("auto", "json", "msgpack", "senml", "number")
SUBS = {
    (fmt, ts): SubscriptionConfig(topic="s/{device}/{metric}", format=fmt, timestamp=ts)
    for fmt in FORMATS
    for ts in ("payload", "arrival")
}


def _decode(payload: bytes, fmt: str, ts: str, metric: str | None) -> list | None:
    try:
        return decode_payload(payload, SUBS[fmt, ts], metric, ARRIVAL)
    except DecodeError as exc:
        assert isinstance(exc.reason, str) and exc.reason, f"a DecodeError without reason: {exc!r}"
        return None


def one_input(data: bytes) -> None:
    head, payload = (data[0], data[1:]) if data else (0, b"")
    fmt = FORMATS[head % len(FORMATS)]
    ts_mode = "arrival" if head & 0x08 else "payload"
    metric = None if head & 0x10 else "temp"
    rows = _decode(payload, fmt, ts_mode, metric)
    if not rows:
        return
    for device, m, ts, value, tags in rows:
        assert device is None or isinstance(device, str)
        assert isinstance(m, str) and m, m
        assert type(ts) is int and 946_684_800_000 <= ts < 4_102_444_800_000, ts
        assert ts <= ARRIVAL + 86_400_000, ts
        assert type(value) is float and math.isfinite(value) and abs(value) <= 1e250, value
        assert tags is None or all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
        )
    if len(rows) > 10_000:
        return
    objs = []
    for device, m, ts, value, tags in rows:
        obj = {"ts": ts, "metric": m, "value": value}
        if device is not None:
            obj["device"] = device
        if tags is not None:
            obj["tags"] = tags
        objs.append(obj)
    for fmt, enc in (("json", lambda o: json.dumps(o).encode()), ("msgpack", msgpack.packb)):
        again = _decode(enc(objs), fmt, "payload", None)
        assert again == rows, f"{fmt} round trip: {rows!r} -> {again!r}"


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
