"""Coverage-guided fuzzing of the receiver's upload decoding: ``cloud._wire.decompress``
(identity, zstd, gzip, unknown encodings) and ``cloud._wire.decode_upload``.

Only a :class:`cloud._errors.Rejected` with a 4xx status, a code and a detail may escape;
anything accepted obeys the protocol's limits and decodes to the same upload when encoded
again.  Run from the repository root (docs/security.md, "Fuzzing")::

    python fuzz/wire.py -runs=20000 CORPUS_DIR fuzz/corpus/wire
"""

from __future__ import annotations

import gzip
import math
import sys

import atheris
import msgpack
import zstandard

with atheris.instrument_imports(include=["cloud"]):
    from cloud._errors import Rejected
    from cloud._wire import TS_MIN_MS, WireLimits, decode_upload, decompress, name_problem

DEVICE = "edge-1"
NOW = 1_700_000_000_000
LIMITS = WireLimits(max_batches=8, max_readings=2000, max_dead_letters=8, max_name_chars=64)
MAX_BODY = 1 << 20
ENCODINGS = ("identity", "zstd", "gzip", "zstd", "gzip", "br")


def _refused(exc: Rejected) -> None:
    assert 400 <= exc.status < 500, f"status {exc.status} for {exc}"
    assert exc.code and exc.detail, f"a refusal without code or detail: {exc!r}"


def _body(data: bytes) -> bytes | None:
    """The decompressed body: byte 0 picks how the rest is sent (compressed here first, or
    given as a compressed stream as is)."""
    mode, rest = (data[0] % len(ENCODINGS), data[1:]) if data else (0, b"")
    encoding = ENCODINGS[mode]
    if mode == 1:
        sent = zstandard.ZstdCompressor().compress(rest)
    elif mode == 2:
        sent = gzip.compress(rest, mtime=0)
    else:
        sent = rest
    try:
        out = decompress(sent, encoding, MAX_BODY)
    except Rejected as exc:
        _refused(exc)
        assert mode not in (0, 1, 2), f"own {encoding} stream refused: {exc}"
        return None
    if mode in (0, 1, 2):
        assert out == rest, f"{encoding} did not round-trip"
    return out


def _encode(up) -> bytes:  # noqa: ANN001 - a cloud._wire.Upload
    batches = [
        msgpack.packb(
            {
                "seq": b.seq,
                "series": [[s, m, dict(t) or None] for s, m, t in b.series],
                "sid": b.sid,
                "ts": b.ts,
                "val": b.val,
                "flags": b.flags,
            }
        )
        for b in up.batches
    ]
    top = {"v": 1, "device": up.device, "status": up.status, "batches": batches}
    top["dead_letters"] = [
        {"seq": d.seq, "ts": d.ts, "topic": d.topic, "stage": d.stage, "reason": d.reason,
         "size": d.size}
        for d in up.dead_letters
    ]  # fmt: skip
    return msgpack.packb(top, use_bin_type=True)


def _check_accepted(up) -> None:  # noqa: ANN001
    assert up.readings <= LIMITS.max_readings
    for b in up.batches:
        n = len(b.ts)
        assert n and len(b.sid) == len(b.val) == len(b.flags) == n
        for s, m, tags in b.series:
            assert name_problem(s, 64) is None and name_problem(m, 64) is None, (s, m)
            assert len(tags) <= LIMITS.max_tags
        for sid, ts, v, f in zip(b.sid, b.ts, b.val, b.flags, strict=True):
            assert type(sid) is int and 0 <= sid < len(b.series)
            assert type(ts) is int and TS_MIN_MS <= ts <= NOW + LIMITS.max_future_ms
            assert type(v) is float and math.isfinite(v) and abs(v) <= 1e250, v
            assert type(f) is int and 0 <= f < 2**32


def one_input(data: bytes) -> None:
    body = _body(data)
    if body is None:
        return
    try:
        up = decode_upload(body, DEVICE, LIMITS, now=NOW)
    except Rejected as exc:
        _refused(exc)
        return
    _check_accepted(up)
    again = decode_upload(_encode(up), DEVICE, LIMITS, now=NOW)
    key = [(b.seq, b.series, b.sid, b.ts, b.val, b.flags) for b in up.batches]
    assert key == [(b.seq, b.series, b.sid, b.ts, b.val, b.flags) for b in again.batches]
    assert again.dead_letters == up.dead_letters and again.status == up.status


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
