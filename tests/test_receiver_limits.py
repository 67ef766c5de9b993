"""Bounded decoding at the real receiver (``edgepipe-cloud serve`` on loopback): small bodies
that inflate to millions of objects, unbounded series and names, extreme timestamps and
values, unbounded query parameters.  Each is refused with a 4xx and a precise reason, costs
the receiver almost no memory and logs no traceback; what is valid still works."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
import zstandard

from tests.helpers.cloud_client import DeviceClient, make_batch, series_readings
from tests.helpers.sync_env import Receiver

TOKEN = "limits-test-token"
T0 = 1_700_000_000_000


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture
def rx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv("EDGEPIPE_CLOUD_API_TOKEN", TOKEN)
    monkeypatch.setenv("EDGEPIPE_CLOUD_MAX_NEW_SERIES_PER_REQUEST", "5")
    monkeypatch.setenv("EDGEPIPE_CLOUD_MAX_SERIES_PER_DEVICE", "8")
    monkeypatch.setenv("EDGEPIPE_CLOUD_MAX_NAME_CHARS", "64")
    # these tests send hostile bodies back to back from one device: the per-device rate
    # limit (tested in test_receiver_hardening.py) must not answer before the decoder does
    monkeypatch.setenv("EDGEPIPE_CLOUD_DEVICE_UPLOADS_PER_S", "1000")
    monkeypatch.setenv("EDGEPIPE_CLOUD_DEVICE_UPLOAD_BURST", "1000")
    r = Receiver(tmp_path)
    r.secret = r.add_device("edge-1")  # type: ignore[attr-defined]
    with r:
        yield r


@pytest.fixture
def dev(rx: Receiver) -> Iterator[DeviceClient]:
    c = DeviceClient(rx.url, "edge-1", bytes.fromhex(rx.secret))  # type: ignore[attr-defined]
    yield c
    c.close()


@pytest.fixture
def op(rx: Receiver) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=rx.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as c:
        yield c


def _zstd(obj: object) -> bytes:
    return zstandard.ZstdCompressor(level=19).compress(msgpack.packb(obj, use_bin_type=True))


def _refused(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"], r.json()


def _batch(seq: int, series: list, sid: list, ts: list, val: list) -> bytes:
    return msgpack.packb(
        {"seq": seq, "series": series, "sid": sid, "ts": ts, "val": val, "flags": [0] * len(ts)}
    )


# -- amplification ---------------------------------------------------------------------------
def _inflating_bodies(n: int, many: int, pad: bytes = b"") -> dict[str, tuple[bytes, int, str]]:
    """Small bodies that would build ``n`` (or ``many``) objects once decoded; ``pad``
    (random bytes, after what is refused) makes them as large as the attacker likes."""
    top = {"v": 1, "device": "edge-1", "batches": []}

    def body(**fields: object) -> bytes:
        return _zstd({**top, **fields, **({"zz": pad} if pad else {})})

    def column(sid: list) -> bytes:  # the batches are read once the top level is
        return _zstd({**top, "batches": [_batch(1, [["s", "m", None]], sid, [pad], [])]})

    return {
        # empty maps under an unknown key (the reported 1,948-byte body)
        "unknown key": (body(junk=[{}] * n), 400, "unknown key 'junk'"),
        # the same where bins belong, and where dead letters belong
        "maps as batches": (body(batches=[{}] * n), 400, "batches (at most 1000)"),
        "dead letters of maps": (body(dead_letters=[{}] * n), 400, "dead letters (at most 1000)"),
        # a batch whose column holds empty maps instead of numbers
        "maps in a column": (
            column([{}] * n),
            400,
            "batches[0]",
        ),
        "deep nesting": (body(status=[[[[[[[[]]]]]]]]), 400, "expected a map"),
        # millions of them: the compression ratio alone refuses the body
        "millions under an unknown key": (
            body(junk=[{}] * many),
            413,
            "decompressed body would exceed 100 times",
        ),
        "millions in a column": (
            column([{}] * many),
            413,
            "decompressed body would exceed 100 times",
        ),
    }


#: What 28 requests of 2 KB (below) may add to the receiver's peak RSS (VmHWM of the real
#: receiver process).  Measured over 15 runs: +416 to +780 KiB, and VmRSS back to within
#: 16 KiB of where it was in 13 of them.  Before: +4.5 GB for one such body without the
#: reader's limits; with them, +4.1 to +6.8 MiB (5 runs), the decompressed body and the
#: unpacker's copy of it kept alive by reference cycles until a garbage collection, with
#: 256 KiB decompressed whatever the ratio.  The bound is 2.6 times the worst run.
HWM_BOUND_KIB = 2 * 1024


def test_small_bodies_that_inflate_cannot_grow_the_receiver(
    rx: Receiver, dev: DeviceClient
) -> None:
    pid = rx.pid
    assert pid is not None
    ok = dev.upload([make_batch(1, series_readings(10))])
    assert ok.status_code == 200, ok.text
    # The same refusals with small bodies first, as often: every code path, worker thread
    # and database connection has run.
    for name, (body, status, _) in _inflating_bodies(1000, 1000).items():
        for _ in range(4):
            assert dev.post_raw(body).status_code in (status, 400), name
    rss0, hwm0 = _status_kb(pid, "VmRSS"), _status_kb(pid, "VmHWM")
    # 2 KB bodies, each decompressing to about 90 times its size (within the ratio of 100,
    # so the reader's limits must refuse them), or to millions of objects (the ratio does).
    pad = random.Random(13).randbytes(1800)
    bodies = _inflating_bodies(180_000, 3_000_000, pad)
    for name, (body, status, needle) in bodies.items():
        assert 1800 < len(body) <= 2048, (name, len(body))
        inflated = len(zstandard.ZstdDecompressor().decompress(body))
        if name != "deep nesting":
            assert inflated > (100 if status == 413 else 90) * len(body), (name, inflated)
        for _ in range(4):
            r = dev.post_raw(body)
            assert r.status_code == status, (name, r.text)
            assert needle in r.json()["detail"], (name, r.json())
    rss1, hwm1 = _status_kb(pid, "VmRSS"), _status_kb(pid, "VmHWM")
    print(f"28 requests of 2 KB: VmHWM +{hwm1 - hwm0} KiB, VmRSS +{rss1 - rss0} KiB")
    # 28 requests that would each have built 180,000 to 3,000,000 objects (13 to 220 MB
    # apiece): a few MB at most, all of them together.
    assert hwm1 - hwm0 <= HWM_BOUND_KIB, (hwm0, hwm1)
    assert rss1 - rss0 <= HWM_BOUND_KIB, (rss0, rss1)
    assert "Traceback" not in rx.log.read_text()


def test_long_strings_are_refused_before_they_are_read(dev: DeviceClient) -> None:
    # (strings that fit the 64 KiB a body may decompress to whatever its ratio: beyond, the
    # ratio refuses them first)
    r = dev.post_raw(_zstd({"v": 1, "device": "edge-1", "batches": [], "k" * 60_000: 1}))
    _refused(r, 400, "string of 60000 bytes (at most 32)")
    letters = random.Random(5).choices("abcdefghijklmnopqrstuvwxyz", k=70_000)
    dl = {"seq": 1, "ts": T0, "topic": "t", "stage": "".join(letters), "reason": "r", "size": 1}
    _refused(dev.upload([], dead_letters=[dl]), 400, "dead_letters[0].stage: string of 70000")
    # The reported 20 MB metric name and 50 MB stage name inflate from a few KB.
    dl["stage"] = "s" * 50_000_000
    _refused(dev.upload([], dead_letters=[dl]), 413, "decompressed body would exceed")
    r = dev.upload([_batch(1, [["s", "m" * 20_000_000, None]], [0], [T0], [1.0])])
    _refused(r, 413, "decompressed body would exceed")
    r = dev.upload([_batch(1, [["s", "m" * 60_000, None]], [0], [T0], [1.0])])
    _refused(r, 400, "batches[0].series[0][1]: string of 60000 bytes (at most 256)")


# -- series and names ------------------------------------------------------------------------
def _series_batch(seq: int, names: list[str], ts: int = T0) -> bytes:
    return _batch(
        seq,
        [["s", m, None] for m in names],
        list(range(len(names))),
        [ts + i for i in range(len(names))],
        [1.0] * len(names),
    )


def test_series_limits_per_request_and_per_device(
    rx: Receiver, dev: DeviceClient, op: httpx.Client
) -> None:
    r = dev.upload([_series_batch(1, [f"m{i}" for i in range(6)])])
    _refused(r, 413, "more than 5 new series")
    assert r.json()["error"] == "too_many_series"
    # Series listed but used by no reading are never created (and do not count).
    unused = _batch(2, [["s", "u0", None], ["s", "m0", None]], [1, 1], [T0, T0 + 1], [1.0, 2.0])
    assert dev.upload([unused]).status_code == 200
    assert dev.upload([_series_batch(3, [f"m{i}" for i in range(5)])]).status_code == 200
    r = dev.upload([_series_batch(4, [f"n{i}" for i in range(4)])])
    _refused(r, 422, "more than 8 series")
    assert r.json()["error"] == "series_limit"
    # Nothing of a refused upload was stored; known series still take readings.
    assert dev.upload([_series_batch(5, ["m0", "m1"], ts=T0 + 10_000)]).status_code == 200
    metrics = op.get("/v1/devices/edge-1/metrics").json()["metrics"]
    assert sorted(m["metric"] for m in metrics) == [f"m{i}" for i in range(5)]
    assert rx.counts()["readings"] == 2 + 5 + 2
    assert "series_limit" in rx.device_row("edge-1")["last_error"]


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("temp\x00evil", "contains U+0000 (a control character) at index 4"),
        ("temp\u202eevil", "contains U+202E (a bidi control) at index 4"),
        ("caf\u0065\u0301", "is not NFC-normalised"),
        ("x" * 65, "is 65 characters long (limit 64)"),
        ("", "is empty"),
    ],
)
def test_bad_names_are_refused(dev: DeviceClient, rx: Receiver, name: str, needle: str) -> None:
    r = dev.upload([_series_batch(1, [name])])
    _refused(r, 400, f"batches[0].series[0][1]: metric {needle}")
    tagged = _batch(1, [["s", "m", {"room": "a\x00b"}]], [0], [T0], [1.0])
    _refused(dev.upload([tagged]), 400, "tag 'room' contains U+0000")
    assert rx.counts()["readings"] == 0


# -- timestamps and values -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ts", "val", "needle"),
    [
        (-(2**63), 1.0, "batches[0].ts[0]: -9223372036854775808 is before 2000-01-01"),
        (2**63 - 1, 1.0, "ahead of the receiver's clock"),
        (4_000_000_000_000, 1.0, "ahead of the receiver's clock"),
        (T0, 1.7e308, "batches[0].val[0]: 1.7e+308 is out of range"),
        (T0, -1e300, "batches[0].val[0]: -1e+300 is out of range"),
    ],
)
def test_extreme_timestamps_and_values_are_refused_without_a_traceback(
    dev: DeviceClient, rx: Receiver, ts: int, val: float, needle: str
) -> None:
    r = dev.upload([_batch(1, [["s", "m", None]], [0], [ts], [val])])
    _refused(r, 400, needle)
    assert rx.counts()["readings"] == 0
    assert "Traceback" not in rx.log.read_text()


def test_large_values_aggregate_without_overflow(dev: DeviceClient, op: httpx.Client) -> None:
    hour = T0 - T0 % 3_600_000
    n = 1000
    big = _batch(1, [["s", "m", None]], [0] * n, [hour + i for i in range(n)], [1e250] * n)
    assert dev.upload([big]).status_code == 200
    for step in (3_600_000, 1000):  # from the hourly rollup, and from the raw rows
        r = op.get(
            "/v1/readings",
            params={"device": "edge-1", "since": hour, "until": hour + 3_600_000, "step": step},
        )
        assert r.status_code == 200, r.text
        row = r.json()["rows"][0]
        assert row["avg"] == pytest.approx(1e250) and row["max"] == 1e250
    chart = op.get(
        "/ui/api/series",
        params={"device": "edge-1", "metric": "m", "since": hour, "until": hour + 3_600_000},
    )
    assert chart.status_code == 200, chart.text
    assert max(a for a in chart.json()["avg"] if a is not None) == pytest.approx(1e250)


# -- query parameters ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {"since": -(2**63)},
        {"until": 2**63},
        {"since": 0, "until": 10**30},
        {"step": 2**63},
        {"since": "9" * 5000},
        {"limit": 10**6},
    ],
)
def test_query_parameters_are_bounded(op: httpx.Client, rx: Receiver, params: dict) -> None:
    r = op.get("/v1/readings", params={"device": "edge-1", **params})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_query"
    chart = {"device": "edge-1", "metric": "m", "since": 0, "until": 1, **params}
    chart.pop("step", None)
    chart.pop("limit", None)
    r = op.get("/ui/api/series", params=chart)
    assert r.status_code in (200, 400), r.text
    r = op.get("/v1/rejections", params={"before": 2**64})
    assert r.status_code == 400, r.text
    assert "Traceback" not in rx.log.read_text()
