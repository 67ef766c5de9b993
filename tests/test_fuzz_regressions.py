"""Inputs the fuzzers found (fuzz/, tests/test_fuzz_api.py), each held here against the
target it broke: it must now meet the documented refusal (docs/security.md, "Fuzzing")."""

from __future__ import annotations

import base64

import pytest

from core._errors import FilterRuntimeError
from core._model import Batch
from pipeline.chain._records import unpack

# fuzz/records.py, the first run: 98 bytes (four records and two bytes) raised TypeError
# ("memoryview: length is not a multiple of itemsize") out of columns().
RECORDS_CRASH = base64.b64decode(
    "AQBo5c+LAQAAAAAAAAAAAAAAAAAAAAAAAABo5c+LAQAAAAAAAAAAAAAAAAAAAAAAAABo5c+LAQAAAAAAAAAAAAAAAAAAAAAAAABo5c+LAQAAAAAAAAAAAAAAAAAAAAAAAAU="
)


@pytest.mark.parametrize("size", [len(RECORDS_CRASH), 1, 23, 25, 47])
def test_output_of_partial_records_is_a_filter_runtime_error(size: int) -> None:
    raw = (RECORDS_CRASH * 2)[:size]
    with pytest.raises(FilterRuntimeError) as err:
        unpack(raw)
    assert err.value.code == "output_size"
    assert f"{size} bytes of output are not whole 24-byte records" in str(err.value)


def test_whole_records_still_parse_and_pack_back() -> None:
    raw = RECORDS_CRASH[:96]  # four whole records
    b = unpack(raw)
    assert len(b) == 4 and b.pack() == raw
    assert b.ts == Batch.unpack(raw).ts
