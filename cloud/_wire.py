"""Decoding of an upload body (wire protocol v1): decompression with a bound, msgpack, shape.

Everything here is pure and synchronous; every refusal is a :class:`Rejected` whose detail
says exactly what was wrong and where (``batches[2].val[7]: expected a number``).
"""

from __future__ import annotations

import hashlib
import io
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zstandard

from ._errors import Rejected

__all__ = ["ENCODINGS", "Batch", "DeadLetter", "Upload", "decode_upload", "decompress"]

ENCODINGS = ("identity", "gzip", "zstd")
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    sha256: str
    #: (source, metric, tags) per local series id, where *source* is the reading's own device
    #: field (a sensor behind the uploading edge device); tags is a sorted tuple of pairs.
    series: list[tuple[str, str, tuple[tuple[str, str], ...]]]
    sid: list[int]
    ts: list[int]
    val: list[float]
    flags: list[int]

    def __len__(self) -> int:
        return len(self.ts)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    ts: int
    topic: str
    stage: str | None
    reason: str
    size: int


@dataclass(slots=True)
class Upload:
    device: str
    status: dict[str, Any]
    batches: list[Batch]
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def readings(self) -> int:
        return sum(len(b) for b in self.batches)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Decode ``body`` without ever producing more than ``limit`` bytes (413 beyond it)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        out = body
    elif encoding == "zstd":
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body))
            out = reader.read(limit + 1)
            if len(out) <= limit and reader.read(1):  # pragma: no cover - read() fills fully
                out += b"x"
        except zstandard.ZstdError as exc:
            raise Rejected(400, "bad_body", f"zstd body cannot be decompressed: {exc}") from None
    elif encoding == "gzip":
        d = zlib.decompressobj(wbits=31)
        try:
            out = d.decompress(body, limit + 1)
        except zlib.error as exc:
            raise Rejected(400, "bad_body", f"gzip body cannot be decompressed: {exc}") from None
        if len(out) <= limit and not d.eof:
            raise Rejected(400, "bad_body", "gzip body is truncated")
    else:
        raise Rejected(
            415,
            "unsupported_encoding",
            f"Content-Encoding {encoding!r} is not supported; use one of {', '.join(ENCODINGS)}",
        )
    if len(out) > limit:
        raise Rejected(
            413,
            "too_large",
            f"decompressed body exceeds the limit of {limit} bytes",
        )
    return out


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types (ExtraData, ValueError, ...)
        raise Rejected(400, "bad_body", f"{what} is not valid msgpack: {exc}") from None


def _bad(where: str, msg: str) -> Rejected:
    return Rejected(400, "bad_body", f"{where}: {msg}")


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not _INT64[0] <= v <= _INT64[1]:
        raise _bad(where, f"expected a 64-bit integer, got {type(v).__name__}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise _bad(where, "expected a non-empty string")
    return v


def _map(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise _bad(where, f"expected a map, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise _bad(where, f"expected an array, got {type(v).__name__}")
    return v


def _decode_batch(raw: bytes, where: str) -> Batch:
    b = _map(_unpack(raw, where), where)
    for key in ("seq", "series", "sid", "ts", "val", "flags"):
        if key not in b:
            raise _bad(where, f"missing key {key!r}")
    seq = _int(b["seq"], f"{where}.seq")
    if seq < 0:
        raise _bad(f"{where}.seq", "must be >= 0")
    series = []
    for i, s in enumerate(_list(b["series"], f"{where}.series")):
        w = f"{where}.series[{i}]"
        s = _list(s, w)
        if len(s) != 3:
            raise _bad(w, "expected [device, metric, tags]")
        sdev, metric = _str(s[0], f"{w}[0]"), _str(s[1], f"{w}[1]")
        tags: tuple[tuple[str, str], ...] = ()
        if s[2] is not None:
            t = _map(s[2], f"{w}[2]")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in t.items()):
                raise _bad(f"{w}[2]", "tags must map strings to strings")
            tags = tuple(sorted(t.items()))
        series.append((sdev, metric, tags))
    sid = _list(b["sid"], f"{where}.sid")
    ts = _list(b["ts"], f"{where}.ts")
    val = _list(b["val"], f"{where}.val")
    flags = _list(b["flags"], f"{where}.flags")
    n = len(ts)
    if not len(sid) == len(val) == len(flags) == n:
        raise _bad(
            where,
            f"columns differ in length (sid {len(sid)}, ts {n}, val {len(val)}, flags {len(flags)})",
        )
    nseries = len(series)
    if not (n and _columns_ok(sid, ts, val, flags, nseries)):
        _locate_bad_value(where, sid, ts, val, flags, nseries)
    return Batch(seq, hashlib.sha256(raw).hexdigest(), series, sid, ts, val, flags)


def _columns_ok(sid: list, ts: list, val: list, flags: list, nseries: int) -> bool:
    """Whole-column checks in C-speed builtins; the common, valid case."""
    _int_only = {int}
    if set(map(type, sid)) != _int_only or min(sid) < 0 or max(sid) >= nseries:
        return False
    if set(map(type, ts)) != _int_only or min(ts) < _INT64[0] or max(ts) > _INT64[1]:
        return False
    if set(map(type, flags)) != _int_only or min(flags) < 0 or max(flags) >= 2**32:
        return False
    kinds = set(map(type, val))
    if not kinds <= {float, int}:
        return False
    if int in kinds:
        val[:] = map(float, val)
    return all(map(math.isfinite, val))


def _locate_bad_value(
    where: str, sid: list, ts: list, val: list, flags: list, nseries: int
) -> None:
    """Find and report the first bad element (slow path, only for invalid or empty input)."""
    n = len(ts)
    for i in range(n):
        s = sid[i]
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < nseries:
            raise _bad(f"{where}.sid[{i}]", f"not an index into series (0..{nseries - 1})")
        _int(ts[i], f"{where}.ts[{i}]")
        v = val[i]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _bad(f"{where}.val[{i}]", "expected a number")
        if isinstance(v, int):
            val[i] = v = float(v)
        if not math.isfinite(v):
            raise _bad(f"{where}.val[{i}]", "expected a finite number")
        f = flags[i]
        if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < 2**32:
            raise _bad(f"{where}.flags[{i}]", "expected an unsigned 32-bit integer")


def _decode_dead_letter(d: Any, where: str) -> DeadLetter:
    d = _map(d, where)
    for key in ("seq", "ts", "topic", "reason", "size"):
        if key not in d:
            raise _bad(where, f"missing key {key!r}")
    stage = d.get("stage")
    if stage is not None and not isinstance(stage, str):
        raise _bad(f"{where}.stage", "expected a string or nil")
    topic, reason = d["topic"], d["reason"]
    if not isinstance(topic, str) or not isinstance(reason, str):
        raise _bad(where, "topic and reason must be strings")
    return DeadLetter(
        _int(d["seq"], f"{where}.seq"),
        _int(d["ts"], f"{where}.ts"),
        topic[:1024],
        stage,
        reason[:4096],
        _int(d["size"], f"{where}.size"),
    )


_STATUS_INTS = ("backlog_batches", "backlog_readings", "dead_letters")


def _decode_status(s: Any) -> dict[str, Any]:
    s = _map(s, "status")
    out: dict[str, Any] = {}
    for key in _STATUS_INTS:
        if key in s:
            out[key] = _int(s[key], f"status.{key}")
    if "oldest_unsynced_ms" in s:
        v = s["oldest_unsynced_ms"]
        out["oldest_unsynced_ms"] = None if v is None else _int(v, "status.oldest_unsynced_ms")
    if "link" in s:
        if not isinstance(s["link"], str):
            raise _bad("status.link", "expected a string")
        out["link"] = s["link"][:32]
    return out


def decode_upload(data: bytes, device: str) -> Upload:
    """Decode a decompressed body sent by ``device`` (the authenticated header value)."""
    top = _map(_unpack(data, "body"), "body")
    if top.get("v") != 1:
        raise _bad("v", f"unsupported protocol version {top.get('v')!r} (expected 1)")
    if top.get("device") != device:
        raise Rejected(
            400, "device_mismatch", "body 'device' does not match the X-Edgepipe-Device header"
        )
    status = _decode_status(top.get("status", {}))
    raw = _list(top.get("batches"), "batches")
    batches = []
    for i, r in enumerate(raw):
        if not isinstance(r, bytes):
            raise _bad(f"batches[{i}]", "expected bin (the msgpack bytes of one batch)")
        batches.append(_decode_batch(r, f"batches[{i}]"))
    batches.sort(key=lambda b: b.seq)
    dls = [
        _decode_dead_letter(d, f"dead_letters[{i}]")
        for i, d in enumerate(_list(top.get("dead_letters", []), "dead_letters"))
    ]
    return Upload(device, status, batches, dls)
