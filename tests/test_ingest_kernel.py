"""The ingest kernel (pipeline/ingest/kernel): its binary matches its source, its
identities are hashlib's keyed BLAKE2b bit for bit, and the decoder with it gives exactly
what the pure-Python path gives (hypothesis, over payloads of every awkward shape)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from array import array
from pathlib import Path

from hypothesis import event, given, settings
from hypothesis import strategies as st

from config._models import SubscriptionConfig
from core._model import SeriesRegistry
from pipeline.ingest._decoder import Decoder
from pipeline.ingest._kernel import IngestKernel
from pipeline.ingest._mqtt import Message

ROOT = Path(__file__).resolve().parent.parent
ARRIVAL = 1_764_600_000_000


def test_committed_kernel_matches_its_source():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipeline/ingest/kernel/build.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_identities_are_hashlibs_keyed_blake2b():
    lengths = [*range(0, 300), 383, 384, 385, 1000, 4096, 70_000]
    keys = [b"", b"k", bytes(range(32)), bytes(range(63)), bytes(range(64))]
    for key in keys:
        kernel = IngestKernel(key, ["ts"], 1 << 20)
        for topic in (b"", b"t", b"bench/dev1/m1", b"x" * 127, b"y" * 200):
            payloads = [bytes((i * 7 + j) % 251 for j in range(n)) for i, n in enumerate(lengths)]
            parts = [x for p in payloads for x in (topic + b"\0", p)]
            n = len(payloads)
            ids, status, recs = kernel.run(parts, array("q", [-1] * n), array("q", [0] * n))
            assert status == bytes(n) and recs == b""
            for i, p in enumerate(payloads):
                want = hashlib.blake2b(topic + b"\0" + p, digest_size=16, key=key).digest()
                assert ids[16 * i : 16 * i + 16] == want, (key, topic, len(p))


SUBS = [
    SubscriptionConfig(topic="s/{device}/{metric}"),
    SubscriptionConfig(topic="j/{device}/{metric}", format="json", timestamp_field="time"),
    SubscriptionConfig(topic="m/{device}", format="json", metric="rh"),
    SubscriptionConfig(topic="n/{metric}", format="number", device="fixed"),
]
TOPICS = ["s/d1/temp", "s/d2/rh", "j/d3/co", "m/d4", "n/volts", "s/", "s/b@d/x"]

_numbers = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(1e8, 1e11).map(repr),
    st.floats(1.0e9, 1.8e9).map(lambda f: f"{f:.6f}"),
    st.floats(1.0e9, 1.8e9).map(lambda f: f"{f:.9f}"),
    st.tuples(st.integers(0, 10**20), st.integers(-30, 30)).map(lambda t: f"{t[0]}e{t[1]}"),
    st.tuples(st.integers(0, 10**12), st.integers(0, 10**9)).map(lambda t: f"{t[0]}.{t[1]}"),
    st.sampled_from(
        [
            "-0.0",
            "0.0",
            "-0",
            "01.5",
            "00",
            "1.",
            ".5",
            "-",
            "1e",
            "1e+",
            "1E5",
            "1e400",
            "-1e400",
            "1e250",
            "1.0000000000000001e250",
            "-1e250",
            "2.5e-324",
            "NaN",
            "Infinity",
            "-Infinity",
            "9007199254740993.0",
            "9007199254740992.0",
            "946684800.0",
            "946684799.9995",
            "946684799.9994",
            "4102444799.9995",
            "4102444799.9994",
            "4102444800.0",
            "1764686400.0",
            "1764686400.0005",
            "1764686400.0004",
            "1764686400.001",
            "1764600000.0005",
            "100000000.0",
            "100000000.00000001",
            "99999999999.99998",
            "1e8",
            "1e11",
            "1764600000.123456",
            "1764600000.1234567890123",
            "12345678901234567890.0",
        ]
    ),  # fmt: skip
)
_tokens = st.one_of(
    _numbers,
    st.sampled_from(
        [
            '"x"',
            '"a\\"b"',
            '"\\u00e9"',
            '"é"',
            "true",
            "false",
            "null",
            "{}",
            '{"a": 1.5}',
            "[1.5]",
            "[]",
            '"\\n"',
            '"\x01"',
            "tru",
            "nul",
        ]
    ),  # fmt: skip
)
_keys = st.sampled_from(
    ["value", "ts", "time", "seq", "device", "metric", "tags", "v", "t", "va\\u006cue",
     "válue", "", "x"]
)  # fmt: skip
_ws = st.sampled_from(["", "", "", "", " ", " ", "  ", "\t", "\n", "\r\n"] * 4 + ["\x0b", "\u00a0"])


@st.composite
def _payloads(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=80))
    fields = draw(st.lists(st.tuples(_keys, _tokens), max_size=6 if kind < 3 else 1))
    if kind >= 3:  # the common shape (timestamp field of either subscription), or nearly
        good = st.sampled_from(["1764600000.123456", "1764600000.5", "1764600000.0005"])
        value = draw(st.one_of(st.just("3.25"), st.just("-0.0"), _numbers))
        ts = draw(st.one_of(good, good, _numbers))
        fields = [("value", value), (draw(st.sampled_from(["ts", "time"])), ts), *fields]
        fields = draw(st.permutations(fields))
    text = "{" + draw(_ws)
    text += ",".join(f'{draw(_ws)}"{k}"{draw(_ws)}:{draw(_ws)}{v}{draw(_ws)}' for k, v in fields)
    text += "}" + draw(_ws)
    raw = text.encode()
    cut = draw(st.sampled_from([None] * 6 + [-1, 1, 5]))
    if cut is not None:
        raw = raw[:cut] if cut < 0 else raw[: len(raw) // cut]
    if draw(st.integers(0, 19)) == 0:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xe9"])) + raw[at:]
    return raw


_batches = st.lists(
    st.tuples(
        st.sampled_from(TOPICS[:3] * 4 + TOPICS),
        _payloads(),
        st.sampled_from([0, 1, 1, 1]),
        st.booleans(),
        st.sampled_from([ARRIVAL, ARRIVAL, 0, 2**62]),
    ),
    max_size=25,
)


def _run(dec: Decoder, batches, skips, kernel: bool):
    out: list = []
    for batch, skip in zip(batches, skips, strict=True):
        msgs = [
            Message(t, p, q, i + 1, dup, arrival, 1, dup)
            for i, (t, p, q, dup, arrival) in enumerate(batch)
        ]
        if kernel:
            dups = dec.dup_identities(msgs)
            got = dec.decode(msgs, skip)
        else:
            dups = dec.dup_identities_python(msgs)
            got = dec.decode_python(msgs, skip)
        out.append((dups, bytes(got.batch.raw), got.dead_letters, got.keys))
    return out


@settings(max_examples=1000, deadline=None)
@given(st.lists(_batches, min_size=1, max_size=3), st.data())
def test_kernel_path_decodes_exactly_like_python(batches, data):
    """Byte-identical batches, the same dead letters and identities, batch after batch
    (the first sight of a topic goes through Python, later ones through the kernel)."""
    # skip: identities of some of the messages, as the store would report them
    skips = []
    for batch in batches:
        picks = data.draw(st.lists(st.booleans(), min_size=len(batch), max_size=len(batch)))
        skips.append(
            {
                hashlib.blake2b(f"{t}\0".encode() + p, digest_size=16, key=b"k").digest()
                for (t, p, *_), pick in zip(batch, picks, strict=True)
                if pick
            }
        )
    batches = batches + batches  # again: every topic's series is known by now

    def make():
        return Decoder(SUBS, SeriesRegistry(), device_id="t", max_payload=150, identity_key=b"k")

    skips = skips + skips
    fast = make()
    assert _run(fast, batches, skips, True) == _run(make(), batches, skips, False)
    made = sum(
        fast._kernel_run(msgs)[1].count(1)
        for msgs in [
            [Message(t, p, q, 1, dup, arrival, 1, dup) for t, p, q, dup, arrival in b]
            for b in batches
        ]
        if msgs
    )
    event(f"kernel records: {'some' if made else 'none'}")


def test_the_bench_payload_takes_the_kernel():
    dec = Decoder(SUBS, SeriesRegistry(), device_id="t", max_payload=150, identity_key=b"k")
    p = b'{"seq": 12, "value": 3.0, "ts": 1764600000.123456}'
    msgs = [Message("s/d1/temp", p, 1, i, False, ARRIVAL, 1) for i in range(3)]
    dec.decode(msgs)  # the first sight of the topic: Python, which interns the series
    _, status, recs = dec._kernel_run(msgs)
    assert status == b"\x01\x01\x01" and len(recs) == 72
    assert dec.decode(msgs).batch.raw == dec.decode_python(msgs).batch.raw
