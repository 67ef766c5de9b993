"""Decoding of upload bodies: limits on decompression and exact error locations."""

from __future__ import annotations

import gzip
import math
import random

import msgpack
import pytest
import zstandard

from cloud import Rejected
from cloud._wire import RATIO_FREE_BYTES, WireLimits, decode_upload, decompress

T0 = 1_700_000_000_000


def _batch(**over: object) -> bytes:
    b = {
        "seq": 1,
        "series": [["s", "m", None], ["s", "n", {"k": "v"}]],
        "sid": [0, 1, 0],
        "ts": [T0, T0 + 1, T0 + 2],
        "val": [1.0, 2, 3.5],
        "flags": [0, 1, 2**32 - 1],
    }
    b.update(over)
    return msgpack.packb(b)


def _body(*batches: bytes, **top: object) -> bytes:
    return msgpack.packb({"v": 1, "device": "d", "batches": list(batches), **top})


def test_valid_body_decodes() -> None:
    up = decode_upload(_body(_batch(seq=9), _batch(seq=4)), "d")
    assert [b.seq for b in up.batches] == [4, 9]
    b = up.batches[0]
    assert b.val == [1.0, 2.0, 3.5] and all(type(v) is float for v in b.val)
    assert b.series[1] == ("s", "n", (("k", "v"),))
    assert up.readings == 6


@pytest.mark.parametrize(
    ("over", "where"),
    [
        ({"sid": [0, 2, 0]}, "batches[0].sid[1]"),
        ({"sid": [0, True, 0]}, "batches[0].sid[1]"),
        ({"ts": [T0, 2.5, T0]}, "batches[0].ts[1]"),
        ({"ts": [T0, T0, 2**64 - 1]}, "batches[0].ts[2]"),
        ({"val": [1.0, math.nan, 3.0]}, "batches[0].val[1]"),
        ({"val": [1.0, 2.0, None]}, "batches[0].val[2]"),
        ({"flags": [0, -1, 0]}, "batches[0].flags[1]"),
        ({"flags": [0, 0, 2**32]}, "batches[0].flags[2]"),
        ({"val": [1.0]}, "batches[0]: columns differ"),
        ({"series": [["s", "m"]]}, "batches[0].series[0]"),
        ({"series": [["s", "m", {"k": 1}]]}, "batches[0].series[0][2]"),
        ({"seq": -1}, "batches[0].seq"),
        ({"seq": "1"}, "batches[0].seq"),
    ],
)
def test_bad_batches_are_located(over: dict, where: str) -> None:
    with pytest.raises(Rejected) as exc:
        decode_upload(_body(_batch(**over)), "d")
    assert exc.value.status == 400 and exc.value.detail.startswith(where), exc.value.detail


def test_bad_top_level() -> None:
    for body, needle in [
        (_body(b"\xc1"), "batches[0]"),
        (_body("not bin"), "batches[0]"),
        (_body(status={"backlog_batches": "x"}), "status.backlog_batches"),
        (_body(dead_letters=[{"seq": 1}]), "dead_letters[0]"),
        (msgpack.packb({"v": 1, "device": "d"}), "batches"),
    ]:
        with pytest.raises(Rejected) as exc:
            decode_upload(body, "d")
        assert needle in exc.value.detail
    with pytest.raises(Rejected) as exc:
        decode_upload(_body(), "other")
    assert exc.value.code == "device_mismatch"


@pytest.mark.parametrize("encoding", ["zstd", "gzip", "identity"])
def test_decompression_is_bounded(encoding: str) -> None:
    data = b"\0" * 100_000
    sent = {"zstd": zstandard.ZstdCompressor().compress, "gzip": gzip.compress}.get(
        encoding, bytes
    )(data)
    assert decompress(sent, encoding, 100_000, max_ratio=None) == data
    with pytest.raises(Rejected) as exc:
        decompress(sent, encoding, 99_999, max_ratio=None)
    assert exc.value.status == 413


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
@pytest.mark.parametrize("declared", [True, False], ids=["size_declared", "size_not_declared"])
def test_beyond_64_kib_a_body_decompresses_to_at_most_100_times_its_size(
    encoding: str, declared: bool
) -> None:
    def sent(data: bytes) -> bytes:
        if encoding == "gzip":
            return gzip.compress(data)
        return zstandard.ZstdCompressor(write_content_size=declared).compress(data)

    free = b"\0" * RATIO_FREE_BYTES  # whatever its ratio
    assert RATIO_FREE_BYTES == 64 * 1024 and len(sent(free)) * 100 < len(free)
    assert decompress(sent(free), encoding, 1 << 20) == free
    with pytest.raises(Rejected) as exc:
        decompress(sent(free + b"\0"), encoding, 1 << 20)
    assert exc.value.status == 413 and "exceed 100 times" in exc.value.detail
    # compressible genuine data within the ratio is accepted far beyond 64 KiB
    rng = random.Random(1)
    data = bytes(rng.choice(b"0123") for _ in range(300_000))
    assert RATIO_FREE_BYTES < len(data) < 100 * len(sent(data))
    assert decompress(sent(data), encoding, 1 << 20) == data


def test_a_zstd_body_of_several_frames_is_refused() -> None:
    z = zstandard.ZstdCompressor()
    body = z.compress(b"\x80") + z.compress(b"\x80")
    with pytest.raises(Rejected) as exc:
        decode_upload(decompress(body, "zstd", 1 << 20), "d", WireLimits())
    assert exc.value.status == 400


def test_truncated_and_unknown_encodings() -> None:
    with pytest.raises(Rejected) as exc:
        decompress(gzip.compress(b"x" * 1000)[:-10], "gzip", 10_000)
    assert exc.value.status == 400 and "truncated" in exc.value.detail
    with pytest.raises(Rejected) as exc:
        decompress(b"x", "deflate", 10)
    assert exc.value.status == 415
