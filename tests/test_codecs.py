"""Payload codecs and topic templates: every format, timestamps, and fuzzing (hypothesis):
no input makes a decoder raise anything but DecodeError."""

from __future__ import annotations

import json
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config._models import SubscriptionConfig
from core._errors import DecodeError
from pipeline.ingest._codecs import TopicTemplate, decode_payload, parse_timestamp
from tests.helpers.strategies import json_values

ARRIVAL = 1_750_000_000_000
FORMATS = ["auto", "json", "msgpack", "senml", "number"]


def sub(**kw) -> SubscriptionConfig:  # noqa: ANN003
    return SubscriptionConfig(topic="s/{device}/{metric}", **kw)


def rows(payload: bytes, fmt: str = "auto", metric: str | None = "temp", **kw):  # noqa: ANN003, ANN201
    return decode_payload(payload, sub(format=fmt, **kw), metric, ARRIVAL)


def test_json_single_metric_with_epoch_seconds():
    assert rows(b'{"ts": 1700000000, "value": 21.5}') == [
        (None, "temp", 1_700_000_000_000, 21.5, None)
    ]


def test_json_several_metrics_device_tags_and_list():
    out = rows(
        b'{"ts": 1700000000123, "device": "d9", "temp": 21, "rh": 40, "seq": 7, "tags": {"room": 3}}'
    )
    assert out == [
        ("d9", "temp", 1_700_000_000_123, 21.0, {"room": "3"}),
        ("d9", "rh", 1_700_000_000_123, 40.0, {"room": "3"}),
    ]
    many = rows(
        b'[{"value": 1, "ts": "2024-01-02T03:04:05Z"}, {"value": 2, "ts": "2024-01-02T03:04:06+01:00"}]'
    )
    assert [r[2] for r in many] == [1_704_164_645_000, 1_704_164_646_000 - 3_600_000]


def test_timestamps_seconds_millis_iso_and_arrival():
    assert parse_timestamp(1_700_000_000) == 1_700_000_000_000
    assert parse_timestamp(1_700_000_000.25) == 1_700_000_000_250
    assert parse_timestamp(1_700_000_000_250) == 1_700_000_000_250
    assert parse_timestamp("2023-11-14T22:13:20") == 1_700_000_000_000
    assert rows(b'{"value": 3}')[0][2] == ARRIVAL
    assert rows(b'{"value": 3, "ts": 1700000000}', timestamp="arrival")[0][2] == ARRIVAL
    for bad in (True, "soon", float("nan"), 5, [1]):
        with pytest.raises(DecodeError):
            parse_timestamp(bad)


def test_msgpack_same_structures_as_json():
    body = {"ts": 1_700_000_000, "temp": 20.5, "rh": 41}
    assert rows(msgpack.packb(body), "msgpack") == rows(json.dumps(body).encode(), "json")
    assert rows(msgpack.packb(body)) == rows(json.dumps(body).encode())  # auto sniffs


def test_senml_base_fields_and_relative_time():
    doc = [
        {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.320067464e9, "bu": "%RH", "v": 20},
        {"n": "temp", "v": 23.1, "t": 60},
        {"n": "label", "vs": "kitchen"},
    ]
    out = rows(json.dumps(doc).encode(), "senml", metric=None)
    # a record named only by bn splits at its last separator
    assert out[0][:2] == ("urn:dev:ow", "10e2073a01080063") and out[0][3] == 20.0
    assert out[1][:3] == ("urn:dev:ow:10e2073a01080063", "temp", 1_320_067_524_000)
    assert len(out) == 2  # the string value carries no reading
    rel = rows(b'[{"n": "dev1:temp", "v": 1.5, "t": -5}]', "senml", metric=None)
    assert rel == [("dev1", "temp", ARRIVAL - 5000, 1.5, None)]
    assert rows(json.dumps(doc).encode(), metric=None) == out  # auto recognises SenML


def test_plain_numbers():
    assert rows(b"21.5") == [(None, "temp", ARRIVAL, 21.5, None)]
    assert rows(b" -3e2 ", "number") == [(None, "temp", ARRIVAL, -300.0, None)]
    for bad in (b"inf", b"nan", b"abc"):
        with pytest.raises(DecodeError):
            rows(bad, "number")
    with pytest.raises(DecodeError, match="no metric"):
        rows(b"1", metric=None)


def test_topic_templates():
    t = TopicTemplate("sensors/{device}/{metric}")
    assert t.filter == "sensors/+/+"
    assert t.match("sensors/d1/temp") == ("d1", "temp")
    assert t.match("sensors/d1") is None and t.match("other/d1/temp") is None
    shared = TopicTemplate("$share/g/site/+/{device}/#")
    assert shared.filter == "$share/g/site/+/+/#"
    assert shared.match("site/x/d2/a/b") == ("d2", None)
    for bad in ("a/{room}", "a/#/b", "$share//x"):
        with pytest.raises(ValueError):
            TopicTemplate(bad)


# -- fuzzing -----------------------------------------------------------------------------


def _decode_all_formats(payload: bytes) -> None:
    for fmt in FORMATS:
        for metric in ("m", None):
            try:
                out = decode_payload(payload, sub(format=fmt), metric, ARRIVAL)
            except DecodeError as e:
                assert e.reason
                continue
            for device, met, ts, value, tags in out:
                assert isinstance(met, str) and met
                assert isinstance(ts, int) and isinstance(value, float) and math.isfinite(value)
                assert device is None or isinstance(device, str)
                assert tags is None or all(isinstance(v, str) for v in tags.values())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_decode_error(payload):
    _decode_all_formats(payload)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_random_json_and_msgpack_only_ever_raise_decode_error(doc):
    _decode_all_formats(json.dumps(doc).encode())
    _decode_all_formats(msgpack.packb(doc, use_bin_type=True) if _packable(doc) else b"\x80")


def _packable(doc: object) -> bool:
    try:
        msgpack.packb(doc)
        return True
    except (OverflowError, ValueError, TypeError):
        return False


def test_deep_nesting_is_a_decode_error():
    for payload in (b"[" * 100_000 + b"]" * 100_000, b"\x91" * 100_000 + b"\x01"):
        with pytest.raises(DecodeError):
            rows(payload)
