"""The Decoder (messages -> batch + dead letters + identities), fuzzed with hypothesis:
any batch of messages decodes without raising, and every message is accounted for."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from config._models import SubscriptionConfig
from core._model import SeriesRegistry
from pipeline.ingest._decoder import Decoder
from pipeline.ingest._mqtt import Message
from tests.helpers.strategies import json_values

SUBS = [
    SubscriptionConfig(topic="s/{device}/{metric}"),
    SubscriptionConfig(topic="j/{device}", format="json"),
    SubscriptionConfig(topic="n/{metric}", format="number", device="fixed"),
]

payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda d: json.dumps(d).encode()),
    st.floats(allow_nan=False).map(lambda f: repr(f).encode()),
)
topics = st.sampled_from(["s/d1/temp", "s/d2/rh", "j/d3", "n/volts", "s/", "j/x/y", "n/a/b"])
messages = st.lists(
    st.tuples(topics, payloads, st.sampled_from([0, 1]), st.booleans()), max_size=30
)


def _decoder() -> Decoder:
    return Decoder(SUBS, SeriesRegistry(), device_id="t", max_payload=150, identity_key=b"k")


@settings(max_examples=300, deadline=None)
@given(messages)
def test_any_batch_decodes_and_every_message_is_accounted_for(items):
    msgs = [
        Message(t, p, q, i + 1, dup, 1_750_000_000_000, 1, dup)
        for i, (t, p, q, dup) in enumerate(items)
    ]
    dec = _decoder()
    dups = dec.dup_identities(msgs)
    assert len(dups) == sum(1 for m in msgs if m.qos and m.maybe_seen)
    out = dec.decode(msgs)
    assert len(out.keys) == sum(1 for m in msgs if m.qos)
    for d in out.dead_letters:
        assert d.reason and isinstance(d.payload, bytes)
    b = out.batch
    assert len(b.ts) == len(b.value) == len(b.series) == len(b.flags)
    # each message alone: either at least one reading and no dead letter, or no reading and
    # exactly one dead letter that keeps it (topic and payload byte for byte)
    ts: list[int] = []
    values: list[float] = []
    series: list[int] = []
    dead = []
    decoded = 0
    for m in msgs:
        one = dec.decode([m])
        if one.dead_letters:
            assert len(one.dead_letters) == 1 and len(one.batch) == 0, (m, one)
            (d,) = one.dead_letters
            assert (d.topic, d.payload) == (m.topic, bytes(m.payload))
            dead.append(d)
        else:
            assert len(one.batch) >= 1, f"message neither decoded nor dead-lettered: {m}"
            decoded += 1
        ts += list(one.batch.ts)
        values += list(one.batch.value)
        series += list(one.batch.series)
    # ... and the whole batch is exactly those readings and dead letters, in message order
    assert decoded + len(out.dead_letters) == len(msgs)  # every message counted once
    assert [(d.topic, d.reason, d.payload) for d in out.dead_letters] == [
        (d.topic, d.reason, d.payload) for d in dead
    ]
    assert len(b) == len(ts)
    assert list(b.ts) == ts and list(b.series) == series
    assert [x.hex() for x in b.value] == [x.hex() for x in values]  # NaN-safe


def test_redeliveries_already_stored_are_skipped_and_identities_are_keyed():
    good = Message("s/d1/temp", b'{"value": 1, "ts": 1700000000}', 1, 1, True, 0, 1, True)
    dec = _decoder()
    key = dec.dup_identities([good])[0]
    assert len(dec.decode([good], {key}).batch) == 0  # already stored: skipped
    assert len(dec.decode([good]).batch) == 1
    other = Decoder(SUBS, SeriesRegistry(), device_id="t", max_payload=150, identity_key=b"j")
    assert other.identity(good) != key  # identities depend on the store's key
    big = good._replace(payload=b" " * 151 + good.payload)
    assert "exceeds max_payload_bytes" in dec.decode([big]).dead_letters[0].reason


def test_a_message_without_readings_is_a_dead_letter_not_silence():
    only_strings = b'[{"n": "d1:label", "vs": "kitchen"}]'
    out = _decoder().decode([Message("s/d1/temp", only_strings, 1, 1, False, 0, 1)])
    assert len(out.batch) == 0
    assert [d.reason for d in out.dead_letters] == ["SenML pack has no numeric values"]


_ARRIVAL = 1_764_590_000_000
_SIMPLE_SHAPES = st.fixed_dictionaries(
    {
        "value": st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(min_value=-1e251, max_value=1e251),
            st.integers(-(10**20), 10**20),
            st.sampled_from([None, "1.5", True]),
        ),
        "ts": st.one_of(
            st.floats(min_value=9e8, max_value=4.2e9),  # around 2000..2100 in seconds
            st.floats(min_value=_ARRIVAL / 1000, max_value=_ARRIVAL / 1000 + 2 * 86_400),
            st.floats(min_value=1e8, max_value=1e13),
            st.integers(0, 5 * 10**12),
            st.sampled_from([None, "2025-12-01T12:00:00Z", float("nan")]),
        ),
    },
    optional={
        "seq": st.integers(),
        "device": st.sampled_from(["other", "", 5]),
        "metric": st.sampled_from(["m2", ""]),
        "tags": st.sampled_from([{"a": "b"}, None, 3]),
        "v": st.floats(allow_nan=False),
    },
)


@settings(max_examples=400, deadline=None)
@given(_SIMPLE_SHAPES, st.sampled_from(["", " ", "\n", " x"]))
def test_the_one_call_path_decodes_as_the_general_one(obj, tail):
    """Payloads of (or close to) the common shape {"value": float, "ts": float}: the
    decoder's one-call path (simple_json) gives what decode_payload gives -- the same
    readings, or a dead letter with the same reason."""
    from core._errors import DecodeError
    from pipeline.ingest._codecs import decode_payload

    payload = (json.dumps(obj) + tail).encode()
    sub = SUBS[0]
    reg = SeriesRegistry()
    try:
        want = [
            (ts, value, reg.intern(dev or "d1", metric, tags))
            for dev, metric, ts, value, tags in decode_payload(payload, sub, "temp", _ARRIVAL)
        ]
        reason = None
    except DecodeError as e:
        want, reason = [], e.reason
    dec = Decoder(SUBS, reg, device_id="t", max_payload=1000, identity_key=b"k")
    got = dec.decode([Message("s/d1/temp", payload, 1, 1, False, _ARRIVAL, 1)])
    assert list(zip(got.batch.ts, got.batch.value, got.batch.series, strict=True)) == want
    assert [d.reason for d in got.dead_letters] == ([reason] if reason else [])
