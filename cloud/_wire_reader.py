"""A msgpack reader that looks at each header before reading on (the wire decoder's tool):
the type and length of the next object are known before anything of it is built, so a
container where a scalar belongs, or a string or array beyond its limit, is refused at no
cost.  Names are checked here too (:func:`name_problem`).
"""

from __future__ import annotations

import functools
import io
import re
import unicodedata
from collections.abc import Iterator
from typing import Any

import msgpack

from ._errors import Rejected

__all__ = ["ARRAY", "MAP", "SCALAR", "STR", "Reader", "bad", "name_problem"]

# -- names ----------------------------------------------------------------------------------
_BAD_CHAR = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def name_problem(s: str, max_chars: int) -> str | None:
    """Why ``s`` is not a valid name (None if it is): non-empty NFC text of at most
    ``max_chars`` characters without control, bidi-control or surrogate characters."""
    if not s:
        return "is empty"
    if len(s) > max_chars:
        return f"is {len(s)} characters long (limit {max_chars})"
    bad = _BAD_CHAR.search(s)
    if bad is not None:
        c = bad.group()
        kind = "a control character" if unicodedata.category(c) == "Cc" else "a bidi control"
        if unicodedata.category(c) == "Cs":
            kind = "a surrogate"
        return f"contains U+{ord(c):04X} ({kind}) at index {bad.start()}"
    if not s.isascii() and not unicodedata.is_normalized("NFC", s):
        return "is not NFC-normalised Unicode"
    return None


# -- the reader -----------------------------------------------------------------------------
class _Nested(Exception):
    """A map or array where the protocol has a scalar (raised inside the unpacker's hooks)."""


def _refuse(obj: Any) -> Any:
    raise _Nested


def bad(where: str, msg: str) -> Rejected:
    return Rejected(400, "bad_body", f"{where}: {msg}")


SCALAR, MAP, ARRAY, STR, BIN, EXT = "scalar", "map", "array", "str", "bin", "ext"
_SIZED = {  # type byte -> (kind, bytes of the big-endian length that follows)
    0xC4: (BIN, 1), 0xC5: (BIN, 2), 0xC6: (BIN, 4),
    0xC7: (EXT, 1), 0xC8: (EXT, 2), 0xC9: (EXT, 4),
    0xD9: (STR, 1), 0xDA: (STR, 2), 0xDB: (STR, 4),
    0xDC: (ARRAY, 2), 0xDD: (ARRAY, 4), 0xDE: (MAP, 2), 0xDF: (MAP, 4),
}  # fmt: skip
_KIND_NAME = {MAP: "a map", ARRAY: "an array", STR: "a string", BIN: "bin", EXT: "ext"}


def _column_list(expect: list[int], lst: list) -> list:
    if len(lst) != expect[0]:  # an array nested in a column
        raise _Nested
    return lst


#: Bytes the unpacker copies from the body at a time.
READ_SIZE = 16 * 1024


class Reader:
    """A msgpack reader over ``data`` that looks at each header before reading on."""

    __slots__ = ("data", "up", "_expect")

    # The unpacker's list hook must not refer to the reader: a reader -> unpacker -> bound
    # method -> reader cycle would keep the body and the unpacker's buffer alive until the
    # next garbage collection (several refused requests later).

    def __init__(self, data: bytes, *, max_str: int, max_bin: int, max_array: int) -> None:
        self.data = data
        self._expect = expect = [-1]  # the length of the column being read, else -1
        self.up = msgpack.Unpacker(
            io.BytesIO(data),
            raw=False,
            strict_map_key=True,
            max_buffer_size=max(len(data), 1024),
            # read in small steps: a body refused at a header is never copied whole (the
            # buffer still grows to the largest single value read, e.g. a batch's column)
            read_size=min(max(len(data), 1024), READ_SIZE),
            max_str_len=max_str,
            max_bin_len=max_bin,
            max_array_len=max_array,
            max_map_len=64,
            max_ext_len=0,
            object_hook=_refuse,
            list_hook=functools.partial(_column_list, expect),
        )

    def peek(self, where: str) -> tuple[str, int]:
        pos = self.up.tell()
        data = self.data
        if pos >= len(data):
            raise bad(where, "the body ends here (truncated)")
        b = data[pos]
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3) or 0xCA <= b <= 0xD3:
            return SCALAR, 0
        if b <= 0x8F:
            return MAP, b & 0x0F
        if b <= 0x9F:
            return ARRAY, b & 0x0F
        if b <= 0xBF:
            return STR, b & 0x1F
        if 0xD4 <= b <= 0xD8:
            return EXT, 0
        if b not in _SIZED:
            raise bad(where, f"not valid msgpack (type byte 0x{b:02x})")
        kind, width = _SIZED[b]
        if pos + 1 + width > len(data):
            raise bad(where, "the body ends here (truncated)")
        return kind, int.from_bytes(data[pos + 1 : pos + 1 + width], "big")

    def _read(self, where: str, fn: Any) -> Any:
        try:
            return fn()
        except _Nested:
            raise bad(where, "expected numbers, found a nested map or array") from None
        except msgpack.OutOfData:
            raise bad(where, "the body ends here (truncated)") from None
        except Exception as exc:  # msgpack raises a zoo of types (ValueError, FormatError...)
            raise bad(where, f"not valid msgpack: {exc}"[:300]) from None

    def expect(self, where: str, kind: str, what: str) -> int:
        got, n = self.peek(where)
        if got != kind:
            found = _KIND_NAME.get(got, "a scalar") if got != SCALAR else "a scalar"
            raise bad(where, f"expected {what}, found {found}")
        return n

    def map_header(self, where: str, max_n: int) -> int:
        n = self.expect(where, MAP, "a map")
        if n > max_n:
            raise bad(where, f"map of {n} entries (at most {max_n})")
        return self._read(where, self.up.read_map_header)

    def array_header(self, where: str, max_n: int, what: str = "entries") -> int:
        n = self.expect(where, ARRAY, "an array")
        if n > max_n:
            raise bad(where, f"array of {n} {what} (at most {max_n})")
        return self._read(where, self.up.read_array_header)

    def scalar(self, where: str) -> Any:
        kind, n = self.peek(where)
        if kind in (MAP, ARRAY, EXT):
            raise bad(where, f"expected a scalar, found {_KIND_NAME[kind]}")
        if kind in (STR, BIN) and n > 64:
            raise bad(where, f"expected a number, found {_KIND_NAME[kind]} of {n} bytes")
        return self._read(where, self.up.unpack)

    def text(self, where: str, max_bytes: int, *, nil: bool = False) -> str | None:
        kind, n = self.peek(where)
        if nil and kind == SCALAR and self.data[self.up.tell()] == 0xC0:
            self.up.skip()
            return None
        if kind != STR:
            raise bad(where, "expected a string" + (" or nil" if nil else ""))
        if n > max_bytes:
            raise bad(where, f"string of {n} bytes (at most {max_bytes})")
        return self._read(where, self.up.unpack)

    def binary(self, where: str) -> bytes:
        self.expect(where, BIN, "bin (the msgpack bytes of one batch)")
        return self._read(where, self.up.unpack)

    def column(self, where: str, n: int) -> list:
        """An array of ``n`` scalars (the unpacker's hooks refuse anything nested)."""
        got = self.expect(where, ARRAY, "an array")
        if got != n:
            batch, _, name = where.rpartition(".")
            raise bad(batch, f"columns differ in length ({name} {got}, the first {n})")
        self._expect[0] = n
        try:
            return self._read(where, self.up.unpack)
        finally:
            self._expect[0] = -1

    def end(self, where: str) -> None:
        if self.up.tell() != len(self.data):
            raise bad(where, f"{len(self.data) - self.up.tell()} bytes of extra data")

    def keys(self, where: str, n: int, known: tuple[str, ...]) -> Iterator[str]:
        """Yield the ``n`` keys of a map being read, each known and given once."""
        seen: set[str] = set()
        for _ in range(n):
            key = self.text(f"{where} key", 32) if self.peek(where)[0] == STR else None
            if key not in known:
                shown = "a non-string key" if key is None else f"unknown key {key!r}"
                raise bad(where, f"{shown} (expected {', '.join(known)})")
            if key in seen:
                raise bad(where, f"key {key!r} given twice")
            seen.add(key)
            yield key
