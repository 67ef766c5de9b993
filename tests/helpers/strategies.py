"""Hypothesis strategies shared by the decoder tests."""

from __future__ import annotations

from hypothesis import strategies as st

__all__ = ["json_values"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(
                [
                    "ts",
                    "t",
                    "time",
                    "value",
                    "v",
                    "n",
                    "bn",
                    "bt",
                    "bv",
                    "tags",
                    "device",
                    "metric",
                    "seq",
                    "temp",
                ]
            )
            | st.text(max_size=8),
            inner,
            max_size=6,
        )
    ),
    max_leaves=25,
)
