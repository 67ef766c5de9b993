"""What a device reports about its bundle is always what the receiver accepts: per-stage
health since the apply from any metric fields, every refusal reason, bounded detail; and the
device's bundle state file is never silently forgotten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud._bundle_api import parse_report
from core._errors import SyncError
from protocol._bundle import DEVICE_REASONS
from sync._bundles import BundleState, CannotApply, stage_health

_stage = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
_label = st.text(min_size=1, max_size=100)
_key = st.one_of(
    st.tuples(st.just("stage"), _stage, st.sampled_from(["in", "out"])),
    st.tuples(st.sampled_from(["drops", "traps"]), _stage, _label),
    st.tuples(st.sampled_from(["dead_letters", "breaker_open"]), _stage),
    st.tuples(st.sampled_from(["stored", "msgs_in"])),
).map(":".join)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_stage, min_size=0, max_size=80, unique=True),
    st.dictionaries(_key, st.integers(0, 2**62), max_size=200),
    st.dictionaries(_key, st.integers(0, 2**62), max_size=50),
    st.sampled_from((None, *DEVICE_REASONS)),
    st.text(max_size=2000),
)
def test_every_report_is_accepted(
    stages: list[str], now: dict, base: dict, reason: str | None, detail: str
) -> None:
    health = stage_health(stages, now, base, 1)
    report = {
        "active_version": 3,
        "previous_version": None,
        "applied_ms": 1,
        "status": "failed" if reason else "applied",
        "version": 4,
        "reason": reason,
        "detail": detail[:500],
        "health": health,
    }
    got = parse_report(json.dumps(report).encode())
    assert got["health"] == health and got["reason"] == reason
    for row in health.values():
        assert min(row["in"], row["out"], row["dead_letters"]) >= 0  # counted from the apply
        assert all(v > 0 for v in row["drops"].values())


def test_health_counts_from_the_apply() -> None:
    now = {"stage:v:in": 50, "stage:v:out": 40, "drops:v:range": 10, "traps:v:oob": 0}
    now |= {"breaker_open:v": 1, "dead_letters:v": 2, "stage:other:in": 99}
    base = {"stage:v:in": 20, "stage:v:out": 15, "drops:v:range": 5, "dead_letters:v": 2}
    h = stage_health(["v"], now, base, 7)
    assert h == {
        "v": {
            "in": 30,
            "out": 25,
            "drops": {"range": 5},
            "dead_letters": 0,
            "traps": {},
            "breaker_open": 1,
            "since_ms": 7,
        }
    }


def test_refusal_reasons_are_the_shared_ones() -> None:
    with pytest.raises(AssertionError):
        CannotApply("because", "x")
    assert CannotApply("invalid_chain", "x").reason == "invalid_chain"


def test_an_unreadable_state_file_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    path = tmp_path / "store.db.bundle.json"
    assert BundleState.load(path) == BundleState()  # none yet: nothing applied
    BundleState(highest=9, active_version=9).save(path)
    assert BundleState.load(path).highest == 9
    path.write_text("{not json")
    with pytest.raises(SyncError, match="refusing bundles"):
        BundleState.load(path)
