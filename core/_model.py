"""The data that flows through edgepipe.

A *reading* is (device, metric, timestamp, numeric value, optional tags).  Inside the
pipeline readings travel as a columnar :class:`Batch`: four parallel lists (timestamp in
milliseconds since the Unix epoch, value, series id, flags).  The strings (device, metric,
tags) live once in the :class:`SeriesRegistry` and a batch refers to them by series id.
That is the shape the Wasm ABI wants (fixed-width records, host keeps the strings) and it
keeps per-reading Python objects off the hot path.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

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


class Flags:
    """Bits of a record's ``flags`` word (bits 16-31 are free for filter authors)."""

    ANOMALY = 1 << 0
    SPIKE = 1 << 1
    AGGREGATE = 1 << 2
    CALIBRATED = 1 << 3


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
    """A columnar batch of readings: parallel lists ``ts``, ``value``, ``series``, ``flags``."""

    __slots__ = ("ts", "value", "series", "flags")

    def __init__(
        self,
        ts: list[int] | None = None,
        value: list[float] | None = None,
        series: list[int] | None = None,
        flags: list[int] | None = None,
    ) -> None:
        self.ts = ts if ts is not None else []
        self.value = value if value is not None else []
        self.series = series if series is not None else []
        self.flags = flags if flags is not None else [0] * len(self.ts)

    def __len__(self) -> int:
        return len(self.ts)

    def __repr__(self) -> str:
        return f"<Batch {len(self)} readings>"

    def append(self, ts: int, value: float, series: int, flags: int = 0) -> None:
        self.ts.append(ts)
        self.value.append(value)
        self.series.append(series)
        self.flags.append(flags)

    def extend(self, other: Batch) -> None:
        self.ts += other.ts
        self.value += other.value
        self.series += other.series
        self.flags += other.flags

    def rows(self) -> Iterator[tuple[int, float, int, int]]:
        return zip(self.ts, self.value, self.series, self.flags, strict=True)

    def take(self, index: Iterable[int]) -> Batch:
        """A new batch holding the rows at ``index`` (in that order)."""
        out = Batch()
        for i in index:
            out.append(self.ts[i], self.value[i], self.series[i], self.flags[i])
        return out

    # -- the fixed binary layout ------------------------------------------------------
    def pack(self) -> bytes:
        """The records in the ABI's fixed 24-byte layout."""
        pack = RECORD.pack
        return b"".join(map(pack, self.ts, self.value, self.series, self.flags))

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Batch:
        out = cls()
        if data:
            ts, value, series, flags = zip(*RECORD.iter_unpack(data), strict=True)
            out.ts, out.value, out.series, out.flags = (
                list(ts),
                list(value),
                list(series),
                list(flags),
            )
        return out

    def readings(self, registry: SeriesRegistry) -> Iterator[Reading]:
        for ts, value, sid, flags in self.rows():
            key = registry.key(sid)
            yield Reading(key.device, key.metric, ts, value, key.tag_dict, flags)


class DeadLetter(NamedTuple):
    """A message or batch the pipeline could not process, kept with the reason why."""

    ts: int  # milliseconds since the epoch, when it was dead-lettered
    topic: str
    reason: str
    payload: bytes
    stage: str | None = None
