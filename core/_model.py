"""The data that flows through edgepipe.

A *reading* is (device, metric, timestamp, numeric value, optional tags).  Inside the
pipeline readings travel as a :class:`Batch`: one buffer of fixed 24-byte records
(timestamp in milliseconds since the Unix epoch, value, series id, flags), the layout of
the Wasm ABI.  The strings (device, metric, tags) live once in the :class:`SeriesRegistry`
and a batch refers to them by series id.  The same buffer goes from the decoder through
every filter stage into the store's sealed row, so the hot path makes no Python object
per reading.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "RECORD",
    "Batch",
    "DeadLetter",
    "Flags",
    "Reading",
    "SeriesKey",
    "SeriesRegistry",
]

#: The fixed binary record layout shared with Wasm guests (see filters/ABI.md):
#: ts i64 (ms), value f64, series u32, flags u32, little-endian, 24 bytes.
RECORD = struct.Struct("<qdII")
_LITTLE = sys.byteorder == "little"


class Flags:
    """Bits of a record's ``flags`` word (bits 16-31 are free for filter authors)."""

    ANOMALY = 1 << 0
    SPIKE = 1 << 1
    AGGREGATE = 1 << 2
    CALIBRATED = 1 << 3
    #: Set by the cloud receiver on the readings of an upload whose signed timestamp was
    #: further from its clock than ``clock_flag_s`` (docs/health.md): their times are
    #: suspect.  Never set on the edge.
    CLOCK_SKEW = 1 << 4


class SeriesKey(NamedTuple):
    device: str
    metric: str
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def tag_dict(self) -> dict[str, str] | None:
        return dict(self.tags) if self.tags else None


class Reading(NamedTuple):
    """One reading, in the form users see (exports, queries, uploads)."""

    device: str
    metric: str
    ts: int  # milliseconds since the Unix epoch
    value: float
    tags: Mapping[str, str] | None = None
    flags: int = 0


def _tags_key(tags: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    if not tags:
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in tags.items()))


class SeriesRegistry:
    """Interns (device, metric, tags) into small integer series ids.

    Ids are dense, start at 0 and never change for the life of a store: the store persists
    every new series in the same transaction as the first batch that uses it, so filter
    state that refers to series ids stays valid across restarts.
    """

    __slots__ = ("_ids", "_keys", "_committed")

    def __init__(self, keys: Iterable[SeriesKey] = ()) -> None:
        self._ids: dict[SeriesKey, int] = {}
        self._keys: list[SeriesKey] = []
        for key in keys:
            self._ids[key] = len(self._keys)
            self._keys.append(key)
        self._committed = len(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def intern(self, device: str, metric: str, tags: Mapping[str, str] | None = None) -> int:
        key = SeriesKey(device, metric, _tags_key(tags))
        sid = self._ids.get(key)
        if sid is None:
            sid = self._ids[key] = len(self._keys)
            self._keys.append(key)
        return sid

    def derive(self, sid: int, suffix: str) -> int:
        """The series with the same device and tags whose metric has ``suffix`` appended."""
        key = self._keys[sid]
        return self.intern(key.device, key.metric + suffix, dict(key.tags))

    def key(self, sid: int) -> SeriesKey:
        return self._keys[sid]

    def get(self, sid: int) -> SeriesKey | None:
        return self._keys[sid] if 0 <= sid < len(self._keys) else None

    def uncommitted(self) -> list[tuple[int, SeriesKey]]:
        """Series created since the last :meth:`mark_committed` (the store persists them)."""
        return [(i, self._keys[i]) for i in range(self._committed, len(self._keys))]

    def mark_committed(self, upto: int | None = None) -> None:
        self._committed = len(self._keys) if upto is None else upto


class Batch:
    """A batch of readings as one buffer of packed records (:data:`RECORD`, 24 bytes each).

    The buffer is what crosses into Wasm (one ``memmove``), what the store seals and what
    stages hand to each other; nothing on the hot path makes a Python object per reading.
    ``ts``, ``value``, ``series`` and ``flags`` are the columns as new lists (for callers
    that want them; built at C speed); :meth:`column` is a zero-copy view of one.
    """

    __slots__ = ("_raw",)

    def __init__(
        self,
        ts: Sequence[int] | None = None,
        value: Sequence[float] | None = None,
        series: Sequence[int] | None = None,
        flags: Sequence[int] | None = None,
    ) -> None:
        self._raw: bytes | bytearray = b""
        if ts:
            self._raw = _interleave(ts, value or (), series or (), flags)

    @classmethod
    def from_records(cls, raw: bytes | bytearray) -> Batch:
        """A batch over ``raw`` (packed records; not copied, so do not change it after)."""
        if len(raw) % RECORD.size:
            raise ValueError(f"{len(raw)} bytes is not a whole number of records")
        out = cls.__new__(cls)
        out._raw = raw
        return out

    @classmethod
    def from_columns(
        cls,
        ts: Sequence[int],
        value: Sequence[float],
        series: Sequence[int],
        flags: Sequence[int] | None = None,
    ) -> Batch:
        """A batch from four columns (lists or arrays, of equal length)."""
        return cls(ts, value, series, flags)

    @property
    def raw(self) -> bytes | bytearray:
        """The packed records (the batch's own buffer, not a copy)."""
        return self._raw

    def __len__(self) -> int:
        return len(self._raw) // 24

    def __repr__(self) -> str:
        return f"<Batch {len(self)} readings>"

    def column(self, name: str) -> Sequence[Any]:
        """A zero-copy view of one column (``ts``, ``value``, ``series`` or ``flags``)."""
        if not _LITTLE:
            return getattr(self, name)
        mv = memoryview(self._raw)
        if name == "ts":
            return mv.cast("q")[0::3]
        if name == "value":
            return mv.cast("d")[1::3]
        return mv.cast("I")[4::6] if name == "series" else mv.cast("I")[5::6]

    def _list(self, name: str, i: int) -> list[Any]:
        if not self._raw:
            return []
        if _LITTLE:
            return self.column(name).tolist()  # type: ignore[attr-defined]
        return [r[i] for r in RECORD.iter_unpack(self._raw)]

    @property
    def ts(self) -> list[int]:
        return self._list("ts", 0)

    @property
    def value(self) -> list[float]:
        return self._list("value", 1)

    @property
    def series(self) -> list[int]:
        return self._list("series", 2)

    @property
    def flags(self) -> list[int]:
        return self._list("flags", 3)

    def append(self, ts: int, value: float, series: int, flags: int = 0) -> None:
        """Add one reading (for building small batches; the hot path builds whole columns
        with :meth:`from_columns`)."""
        if not isinstance(self._raw, bytearray):
            self._raw = bytearray(self._raw)
        self._raw += RECORD.pack(ts, value, series, flags)

    def extend(self, other: Batch) -> None:
        if not other._raw:
            return
        if not self._raw:
            self._raw = other._raw
            return
        if not isinstance(self._raw, bytearray):
            self._raw = bytearray(self._raw)
        self._raw += other._raw

    def rows(self) -> Iterator[tuple[int, float, int, int]]:
        return RECORD.iter_unpack(self._raw)

    def take(self, index: Iterable[int]) -> Batch:
        """A new batch holding the rows at ``index`` (in that order)."""
        raw = self._raw
        if isinstance(index, range) and index.step == 1:
            return Batch.from_records(bytes(raw[index.start * 24 : index.stop * 24]))
        return Batch.from_records(b"".join([raw[i * 24 : i * 24 + 24] for i in index]))

    # -- the fixed binary layout ------------------------------------------------------
    def pack(self) -> bytes:
        """The records in the ABI's fixed 24-byte layout (no copy when already bytes)."""
        raw = self._raw
        return raw if type(raw) is bytes else bytes(raw)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Batch:
        return cls.from_records(data if type(data) is bytes else bytes(data))

    def readings(self, registry: SeriesRegistry) -> Iterator[Reading]:
        for ts, value, sid, flags in self.rows():
            key = registry.key(sid)
            yield Reading(key.device, key.metric, ts, value, key.tag_dict, flags)


def _interleave(
    ts: Sequence[int],
    value: Sequence[float],
    series: Sequence[int],
    flags: Sequence[int] | None,
) -> bytes | bytearray:
    """Four columns -> packed records: four strided copies at C speed."""
    n = len(ts)
    if len(value) != n or len(series) != n or (flags is not None and len(flags) != n):
        raise ValueError("a batch's columns must have the same length")
    if not _LITTLE:
        fl = flags if flags is not None else [0] * n
        return b"".join(map(RECORD.pack, ts, value, series, fl))
    buf = bytearray(24 * n)
    mv = memoryview(buf)
    q, d, u = mv.cast("q"), mv.cast("d"), mv.cast("I")
    q[0::3] = ts if isinstance(ts, array) and ts.typecode == "q" else array("q", ts)
    d[1::3] = value if isinstance(value, array) and value.typecode == "d" else array("d", value)
    u[4::6] = series if isinstance(series, array) and series.typecode == "I" else array("I", series)
    if flags is not None and any(flags):
        u[5::6] = flags if isinstance(flags, array) and flags.typecode == "I" else array("I", flags)
    return buf


class DeadLetter(NamedTuple):
    """A message or batch the pipeline could not process, kept with the reason why."""

    ts: int  # milliseconds since the epoch, when it was dead-lettered
    topic: str
    reason: str
    payload: bytes
    stage: str | None = None
