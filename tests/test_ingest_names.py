"""The edge's decoder: names that are not NFC text, or carry control or bidi characters,
values beyond the receiver's range, timestamps from the future or from an unset clock --
each message becomes a dead letter with its reason, counted, and nothing else is lost."""

from __future__ import annotations

import json

import pytest

from config._models import SubscriptionConfig
from core._metrics import METRICS
from core._model import SeriesRegistry
from pipeline.ingest._decoder import Decoder
from pipeline.ingest._mqtt import Message

ARRIVAL = 1_750_000_000_000
SUBS = [SubscriptionConfig(topic="s/{device}/{metric}", format="json")]


def _decode(topic: str, payload: dict, arrival: int = ARRIVAL) -> tuple[list, list]:
    dec = Decoder(SUBS, SeriesRegistry(), device_id="t", max_payload=100_000)
    good = Message("s/d1/ok", b'{"value": 1}', 1, 1, False, arrival, 1)
    bad = Message(topic, json.dumps(payload).encode(), 1, 2, False, arrival, 1)
    out = dec.decode([good, bad])
    return list(out.batch.value), out.dead_letters


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("s/d1/temp", {"value": 1, "metric": "te\x00mp"}, "invalid metric name"),
        ("s/d1/te\u202emp", {"value": 1}, "invalid metric name"),
        ("s/d\u2066x/temp", {"value": 1}, "invalid device name"),
        ("s/d1/temp", {"value": 1, "device": "d\x1b[31m"}, "invalid device name"),
        ("s/d1/cafe\u0301", {"value": 1}, "invalid metric name"),
        ("s/d1/temp", {"value": 1, "metric": "m" * 257}, "invalid metric name"),
        ("s/d1/temp", {"value": 1, "tags": {"room": "a\x00b"}}, "invalid tag"),
        ("s/d1/temp", {"value": 1, "tags": {"r\u202eoom": "a"}}, "invalid tag"),
        ("s/d1/temp", {"value": 1.7e308}, "value out of range"),
        ("s/d1/temp", {"value": 1, "ts": ARRIVAL + 2 * 86_400_000}, "timestamp in the future"),
    ],
)
def test_bad_names_values_and_times_are_dead_letters(
    topic: str, payload: dict, reason: str
) -> None:
    before = METRICS.value("edgepipe_dead_letters_total", stage="ingest", reason=reason)
    values, dead = _decode(topic, payload)
    assert values == [1.0]  # the good message of the same batch is kept
    assert len(dead) == 1 and dead[0].reason.startswith(reason + ":"), dead
    assert dead[0].payload == json.dumps(payload).encode()  # the raw bytes are kept
    after = METRICS.value("edgepipe_dead_letters_total", stage="ingest", reason=reason)
    assert after == before + 1


def test_unicode_names_that_are_valid_pass() -> None:
    values, dead = _decode("s/d1/caf\u00e9", {"value": 2, "tags": {"pi\u00e8ce": "s\u00e9jour"}})
    assert dead == [] and values == [1.0, 2.0]


def test_an_unset_clock_dead_letters_readings_stamped_with_it() -> None:
    dec = Decoder(SUBS, SeriesRegistry(), device_id="t", max_payload=1000)
    stamped = Message("s/d1/t", b'{"value": 1, "ts": 1700000000}', 1, 1, False, 5_000, 1)
    unstamped = Message("s/d1/t", b'{"value": 2}', 1, 2, False, 5_000, 1)
    out = dec.decode([stamped, unstamped])
    assert list(out.batch.value) == [1.0]
    assert [d.reason.split(":")[0] for d in out.dead_letters] == ["device clock not set"]
