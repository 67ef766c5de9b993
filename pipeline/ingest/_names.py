"""Edge-side checks of the names a reading is filed under (device, metric, tag keys and
values): non-empty NFC text, of bounded length, without control characters (NUL is the
dashboard's series separator), bidi controls (which reorder what an operator reads) or
lone surrogates (which no UTF-8 upload can carry).  The cloud receiver refuses such names
with a 400; checking them here dead-letters one message instead of blocking every upload.

A name that passed is remembered (bounded), so the hot path costs one set lookup.
"""

from __future__ import annotations

import re
import unicodedata

from core._errors import DecodeError

__all__ = ["MAX_NAME_CHARS", "check_names", "check_tag", "name_problem"]

#: Longest device or metric name (the receiver's default ``max_name_chars``).
MAX_NAME_CHARS = 256
_BAD_CHAR = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_ok: set[tuple[str, str]] = set()
_OK_MAX = 100_000


def name_problem(s: str, max_chars: int = MAX_NAME_CHARS) -> str | None:
    """Why ``s`` is not a valid name, or None."""
    if not s:
        return "is empty"
    if len(s) > max_chars:
        return f"is {len(s)} characters long (limit {max_chars})"
    bad = _BAD_CHAR.search(s)
    if bad is not None:
        c = bad.group()
        cat = unicodedata.category(c)
        kind = {"Cc": "a control character", "Cs": "a surrogate"}.get(cat, "a bidi control")
        return f"contains U+{ord(c):04X} ({kind}) at index {bad.start()}"
    if not s.isascii() and not unicodedata.is_normalized("NFC", s):
        return "is not NFC-normalised Unicode"
    return None


def check_names(device: str, metric: str) -> None:
    """DecodeError ("invalid device name: ..." / "invalid metric name: ...") unless both are
    valid names."""
    if (device, metric) in _ok:
        return
    for what, s in (("device", device), ("metric", metric)):
        problem = name_problem(s)
        if problem is not None:
            raise DecodeError(f"invalid {what} name: {s[:40]!r} {problem}")
    if len(_ok) >= _OK_MAX:
        _ok.clear()
    _ok.add((device, metric))


def check_tag(key: str, value: str) -> None:
    """DecodeError ("invalid tag: ...") unless ``key`` and ``value`` are valid (both are
    already cut to 64 and 256 characters by the codecs)."""
    for s in (key, value):
        if not s.isascii() or not s.isprintable():
            problem = name_problem(s, 256) if s else None
            if problem is not None:
                raise DecodeError(f"invalid tag: {s[:40]!r} {problem}")
