"""Write the seed corpora in ``fuzz/corpus/`` (committed; run again after a wire or payload
format change): ``python fuzz/seeds.py``.  Each seed's first byte selects how its harness
reads the rest (see the harness)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import msgpack

HERE = Path(__file__).parent / "corpus"
T0 = 1_700_000_000_000


def _batch(seq: int, n: int, tags: dict | None = None) -> bytes:
    return msgpack.packb(
        {
            "seq": seq,
            "series": [["sensor-1", "temp", tags], ["sensor-2", "rh", None]],
            "sid": [i % 2 for i in range(n)],
            "ts": [T0 + i * 1000 for i in range(n)],
            "val": [20.5 + i for i in range(n)],
            "flags": [i % 3 for i in range(n)],
        }
    )


def _upload(batches: list[bytes], dead: bool = False) -> bytes:
    top = {
        "v": 1,
        "device": "edge-1",
        "status": {
            "backlog_batches": 1,
            "backlog_readings": 10,
            "oldest_unsynced_ms": None,
            "dead_letters": 0,
            "link": "wifi",
        },
        "batches": batches,
    }
    if dead:
        top["dead_letters"] = [
            {"seq": 1, "ts": T0, "topic": "s/a/b", "stage": None, "reason": "bad", "size": 3}
        ]
    return msgpack.packb(top, use_bin_type=True)


def wire() -> dict[str, bytes]:
    one = _upload([_batch(1, 3)])
    return {
        "identity_one_batch": b"\x00" + one,
        "zstd_two_batches": b"\x01" + _upload([_batch(1, 4, {"room": "a"}), _batch(2, 2)]),
        "gzip_dead_letters": b"\x02" + _upload([_batch(7, 1)], dead=True),
        "identity_empty": b"\x00" + _upload([]),
        "zstd_stream_as_sent": b"\x03" + bytes.fromhex("28b52ffd2000050000") + one[:16],
        "unknown_encoding": b"\x05" + one,
    }


def codecs() -> dict[str, bytes]:
    # byte 0: format (auto json msgpack senml number) | 0x08 arrival time | 0x10 no metric
    obj = {"ts": T0, "value": 21.5, "device": "d1", "tags": {"room": "a"}, "seq": 4}
    many = [{"ts": 1_700_000_000, "temp": 21.5, "rh": 40}, {"ts": "2023-11-14T22:13:20Z", "v": 1}]
    senml = [
        {"bn": "urn:dev:1:", "bt": 1_700_000_000, "n": "temp", "v": 21.5},
        {"n": "rh", "v": 40, "t": 1},
    ]
    return {
        "auto_json_object": b"\x00" + json.dumps(obj).encode(),
        "json_list": b"\x01" + json.dumps(many).encode(),
        "msgpack_object": b"\x02" + msgpack.packb(obj),
        "msgpack_list": b"\x12" + msgpack.packb(many),
        "senml": b"\x03" + json.dumps(senml).encode(),
        "auto_senml": b"\x00" + json.dumps(senml).encode(),
        "number": b"\x04" + b"21.5",
        "auto_number_arrival": b"\x08" + b"-3e2",
    }  # fmt: skip


def records() -> dict[str, bytes]:
    rec = struct.Struct("<qdII")
    recs = b"".join(rec.pack(T0 + i, 0.5 * i, i % 3, i) for i in range(6))
    return {
        "halves": b"\x06" + recs,
        "subset": b"\x01" + recs + b"\x2d",
        "subset_reversed": b"\x03" + recs + b"\x3f",
        "subset_changed": b"\x05" + recs + b"\x0f",
        "duplicates": b"\x01" + recs[:24] * 4 + b"\x05",
        "one_record": rec.pack(T0, float("nan"), 0, 1),
    }


def main() -> None:
    for name, seeds in (("wire", wire()), ("codecs", codecs()), ("records", records())):
        d = HERE / name
        d.mkdir(parents=True, exist_ok=True)
        for key, data in seeds.items():
            (d / key).write_bytes(data)


if __name__ == "__main__":
    main()
