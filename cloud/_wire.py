"""Decoding of an upload body (wire protocol v1): bounded decompression, then msgpack read
against the protocol's shape with every count, length and nesting level bounded *before*
anything is materialised.

The top level, the status, the dead letters and each batch's series table are walked
header by header (:class:`Reader` peeks at the next type byte and its length): an unknown
key, a container where a scalar belongs, a string longer than its limit or an array longer
than its count limit is refused before its contents are read.  Only the four reading
columns are unpacked whole, by the C unpacker, with their length known from the header and
any nested map or array refused by the unpacker's hooks as soon as it is built.

Everything here is pure and synchronous; every refusal is a :class:`Rejected` whose detail
says exactly what was wrong and where (``batches[2].val[7]: expected a number``).
"""

from __future__ import annotations

import hashlib
import io
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, NoReturn

import zstandard

from core._clock import now_ms

from ._errors import Rejected
from ._health_wire import RECORD_LIMITS, HealthSnapshot, LogRecord, decode_health, decode_logs
from ._wire_reader import ARRAY, MAP, SCALAR, STR, Reader, bad, name_problem

__all__ = [
    "DEFAULT_LIMITS",
    "ENCODINGS",
    "MAX_ABS_VALUE",
    "TS_MAX_MS",
    "TS_MIN_MS",
    "Batch",
    "DeadLetter",
    "Upload",
    "WireLimits",
    "decode_upload",
    "decompress",
    "name_problem",
]

ENCODINGS = ("identity", "gzip", "zstd")
_INT64 = (-(2**63), 2**63 - 1)
#: Readings must be stamped between 2000-01-01 and 2100-01-01 (ms), like the edge's decoder.
TS_MIN_MS = 946_684_800_000
TS_MAX_MS = 4_102_444_800_000
#: Largest magnitude of a value: a sum of 10**58 of them still fits a double, so no
#: aggregate (hourly totals, bucket sums) can overflow to infinity.
MAX_ABS_VALUE = 1e250
#: A body may decompress to this many bytes whatever its compression ratio (genuine edge
#: uploads compress 3 to 30 times, so this only matters to bodies of a few KB, where an
#: adversary's 60-byte body can otherwise make the receiver hold this much, several times).
RATIO_FREE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Bounds of one upload (the receiver's :class:`cloud._settings.Settings` sets the
    configurable ones; :data:`DEFAULT_LIMITS` are the defaults)."""

    max_batches: int = 1000
    max_readings: int = 1_000_000  # per request, all batches together
    max_dead_letters: int = 1000
    max_name_chars: int = 256  # source and metric
    max_tags: int = 32
    max_tag_key_chars: int = 64
    max_tag_value_chars: int = 256
    max_new_series_per_request: int = 1000
    max_series_per_device: int = 10_000
    #: Readings stamped further ahead of the receiver's clock are refused (a wrong clock).
    max_future_ms: int = 86_400_000 + 300_000
    #: Longest dead-letter text accepted on the wire; stored truncated to the widths below.
    max_text_bytes: int = 65_536
    topic_chars: int = 1024
    stage_chars: int = 256
    reason_chars: int = 4096

    @classmethod
    def from_settings(cls, settings: Any) -> WireLimits:
        return cls(
            max_readings=settings.max_readings_per_request,
            max_name_chars=settings.max_name_chars,
            max_new_series_per_request=settings.max_new_series_per_request,
            max_series_per_device=settings.max_series_per_device,
            max_future_ms=(settings.max_future_s + settings.max_skew_s) * 1000,
        )


DEFAULT_LIMITS = WireLimits()


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
    #: The limits it was decoded with (the store applies the series limits).
    limits: WireLimits = DEFAULT_LIMITS
    #: The device's own records (docs/health.md): health snapshots and warning logs.
    health: list[HealthSnapshot] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)
    #: The device's clock minus the receiver's (ms), from the signed timestamp.
    clock_skew_ms: int | None = None

    @property
    def readings(self) -> int:
        return sum(len(b) for b in self.batches)


# -- decompression --------------------------------------------------------------------------
def decompress(body: bytes, encoding: str, limit: int, *, max_ratio: int | None = 100) -> bytes:
    """Decode ``body`` without ever producing more than ``limit`` bytes, nor (beyond
    :data:`RATIO_FREE_BYTES`) more than ``max_ratio`` times its own size: 413 beyond either."""
    encoding = (encoding or "identity").strip().lower()
    cap = limit
    if max_ratio is not None and encoding != "identity":
        cap = min(limit, max(RATIO_FREE_BYTES, max_ratio * len(body)))
    if encoding == "identity":
        out = body
    elif encoding == "zstd":
        try:
            declared = zstandard.frame_content_size(body)  # -1: not declared
            if declared > cap:  # refused from the frame header, before a byte is made
                _too_much(body, cap, limit, max_ratio)
            if declared >= 0:  # in one go into a buffer of that size (no stream window)
                out = zstandard.ZstdDecompressor().decompress(body, allow_extra_data=False)
            else:
                reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body))
                out = reader.read(cap + 1)
                if len(out) <= cap and reader.read(1):  # a second frame: not one body
                    out += b"x"
        except zstandard.ZstdError as exc:
            raise Rejected(400, "bad_body", f"zstd body cannot be decompressed: {exc}") from None
    elif encoding == "gzip":
        d = zlib.decompressobj(wbits=31)
        try:
            out = d.decompress(body, cap + 1)
        except zlib.error as exc:
            raise Rejected(400, "bad_body", f"gzip body cannot be decompressed: {exc}") from None
        if len(out) <= cap and not d.eof:
            raise Rejected(400, "bad_body", "gzip body is truncated")
    else:
        raise Rejected(
            415,
            "unsupported_encoding",
            f"Content-Encoding {encoding!r} is not supported; use one of {', '.join(ENCODINGS)}",
        )
    if len(out) > cap:
        return _too_much(body, cap, limit, max_ratio)
    return out


def _too_much(body: bytes, cap: int, limit: int, max_ratio: int | None) -> NoReturn:
    if cap < limit:
        raise Rejected(
            413,
            "too_large",
            f"decompressed body would exceed {max_ratio} times its {len(body)} bytes sent "
            f"(limit {cap} bytes): send fewer batches per request",
        )
    raise Rejected(413, "too_large", f"decompressed body exceeds the limit of {limit} bytes")


# -- checks ---------------------------------------------------------------------------------
def _int(v: Any, where: str, lo: int = _INT64[0], hi: int = _INT64[1]) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not _INT64[0] <= v <= _INT64[1]:
        raise bad(where, f"expected a 64-bit integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise bad(where, f"{v} is out of range ({lo}..{hi})")
    return v


def _name(s: str, where: str, what: str, max_chars: int) -> str:
    problem = name_problem(s, max_chars)
    if problem is not None:
        raise bad(where, f"{what} {problem}")
    return s


_BATCH_KEYS = ("seq", "series", "sid", "ts", "val", "flags")


def _series_entry(r: Reader, w: str, lim: WireLimits) -> tuple[str, str, tuple]:
    if r.array_header(w, 3) != 3:
        raise bad(w, "expected [device, metric, tags]")
    name_bytes = 4 * lim.max_name_chars
    source = _name(r.text(f"{w}[0]", name_bytes) or "", f"{w}[0]", "source", lim.max_name_chars)
    metric = _name(r.text(f"{w}[1]", name_bytes) or "", f"{w}[1]", "metric", lim.max_name_chars)
    tags: tuple[tuple[str, str], ...] = ()
    wt = f"{w}[2]"
    kind, _ = r.peek(wt)
    if kind == SCALAR and r.data[r.up.tell()] == 0xC0:
        r.up.skip()
    else:
        if kind != MAP:
            raise bad(wt, "tags must map strings to strings")
        pairs = []
        for _ in range(r.map_header(wt, lim.max_tags)):
            if r.peek(wt)[0] != STR:
                raise bad(wt, "tags must map strings to strings")
            k = r.text(wt, 4 * lim.max_tag_key_chars) or ""
            if r.peek(wt)[0] != STR:
                raise bad(wt, "tags must map strings to strings")
            v = r.text(wt, 4 * lim.max_tag_value_chars) or ""
            _name(k, wt, "tag key", lim.max_tag_key_chars)
            _name(v, wt, f"tag {k!r}", lim.max_tag_value_chars)
            pairs.append((k, v))
        tags = tuple(sorted(pairs))
    return source, metric, tags


def _decode_batch(raw: bytes, where: str, lim: WireLimits, readings_left: int, now: int) -> Batch:
    # Every column is at most as long as the readings the request may still carry.
    r = Reader(
        raw,
        max_str=4 * max(lim.max_name_chars, lim.max_tag_value_chars, 32),
        max_bin=0,
        max_array=max(readings_left, 16),
    )
    got: dict[str, Any] = {}
    for key in r.keys(where, r.map_header(where, len(_BATCH_KEYS)), _BATCH_KEYS):
        w = f"{where}.{key}"
        if key == "seq":
            got[key] = _int(r.scalar(w), w, 0)
        elif key == "series":
            # A series table longer than the batch's readings names series nothing uses.
            n = r.array_header(w, max(1, min(readings_left, lim.max_readings)), "series")
            got[key] = [_series_entry(r, f"{w}[{i}]", lim) for i in range(n)]
        else:
            n = got.setdefault("_n", r.expect(w, ARRAY, "an array"))
            if n > readings_left:
                raise Rejected(
                    413,
                    "too_large",
                    f"{w}: {n} readings exceed the limit of {lim.max_readings} per request",
                )
            got[key] = r.column(w, n)
    r.end(where)
    for key in _BATCH_KEYS:
        if key not in got:
            raise bad(where, f"missing key {key!r}")
    series, sid, ts, val, flags = (got[k] for k in _BATCH_KEYS[1:])
    n = len(ts)
    if len(series) > max(n, 1):
        raise bad(f"{where}.series", f"{len(series)} series for {n} readings")
    ts_max = now + lim.max_future_ms
    if not (n and _columns_ok(sid, ts, val, flags, len(series), ts_max)):
        _locate_bad_value(where, (sid, ts, val, flags), len(series), ts_max, lim.max_future_ms)
    return Batch(got["seq"], hashlib.sha256(raw).hexdigest(), series, sid, ts, val, flags)


def _columns_ok(sid: list, ts: list, val: list, flags: list, nseries: int, ts_max: int) -> bool:
    """Whole-column checks in C-speed builtins; the common, valid case."""
    _int_only = {int}
    if set(map(type, sid)) != _int_only or min(sid) < 0 or max(sid) >= nseries:
        return False
    if set(map(type, ts)) != _int_only or min(ts) < TS_MIN_MS or max(ts) > ts_max:
        return False
    if set(map(type, flags)) != _int_only or min(flags) < 0 or max(flags) >= 2**32:
        return False
    kinds = set(map(type, val))
    if not kinds <= {float, int}:
        return False
    if int in kinds:
        try:
            val[:] = map(float, val)
        except OverflowError:
            return False
    return all(map(math.isfinite, val)) and max(map(abs, val)) <= MAX_ABS_VALUE


def _locate_bad_value(
    where: str, columns: tuple[list, list, list, list], nseries: int, ts_max: int, ahead: int
) -> None:
    """Find and report the first bad element (slow path, only for invalid or empty input)."""
    sid, ts, val, flags = columns
    for i in range(len(ts)):
        s = sid[i]
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < nseries:
            raise bad(f"{where}.sid[{i}]", f"not an index into series (0..{nseries - 1})")
        t = _int(ts[i], f"{where}.ts[{i}]")
        if t < TS_MIN_MS:
            raise bad(f"{where}.ts[{i}]", f"{t} is before 2000-01-01 (is the device clock set?)")
        if t > ts_max:
            raise bad(
                f"{where}.ts[{i}]",
                f"{t} is more than {ahead // 1000} s ahead of the receiver's clock",
            )
        v = val[i]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise bad(f"{where}.val[{i}]", "expected a number")
        if isinstance(v, int):
            try:
                val[i] = v = float(v)
            except OverflowError:
                v = math.inf
        if not math.isfinite(v):
            raise bad(f"{where}.val[{i}]", "expected a finite number")
        if abs(v) > MAX_ABS_VALUE:
            raise bad(f"{where}.val[{i}]", f"{v!r} is out of range (|value| <= 1e250)")
        f = flags[i]
        if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < 2**32:
            raise bad(f"{where}.flags[{i}]", "expected an unsigned 32-bit integer")


_DL_KEYS = ("seq", "ts", "topic", "stage", "reason", "size")


def _decode_dead_letter(r: Reader, where: str, lim: WireLimits) -> DeadLetter:
    got: dict[str, Any] = {}
    for key in r.keys(where, r.map_header(where, len(_DL_KEYS)), _DL_KEYS):
        w = f"{where}.{key}"
        if key in ("topic", "reason"):
            got[key] = r.text(w, lim.max_text_bytes)
        elif key == "stage":
            got[key] = r.text(w, lim.max_text_bytes, nil=True)
        else:
            got[key] = _int(r.scalar(w), w, 0)
    for key in ("seq", "ts", "topic", "reason", "size"):
        if key not in got:
            raise bad(where, f"missing key {key!r}")
    stage = got.get("stage")
    return DeadLetter(
        got["seq"],
        got["ts"],
        got["topic"][: lim.topic_chars],
        None if stage is None else stage[: lim.stage_chars],
        got["reason"][: lim.reason_chars],
        got["size"],
    )


_STATUS_KEYS = ("backlog_batches", "backlog_readings", "oldest_unsynced_ms", "dead_letters", "link")


def _decode_status(r: Reader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in r.keys("status", r.map_header("status", len(_STATUS_KEYS)), _STATUS_KEYS):
        w = f"status.{key}"
        if key == "link":
            out[key] = (r.text(w, 256) or "")[:32]
            continue
        v = r.scalar(w)
        out[key] = None if v is None and key == "oldest_unsynced_ms" else _int(v, w, 0)
    return out


_TOP_KEYS = ("v", "device", "status", "batches", "dead_letters", "health", "logs")


def decode_upload(
    data: bytes, device: str, limits: WireLimits = DEFAULT_LIMITS, *, now: int | None = None
) -> Upload:
    """Decode a decompressed body sent by ``device`` (the authenticated header value);
    ``now`` (ms, default the clock) bounds how far ahead readings may be stamped."""
    now = now_ms() if now is None else now
    r = Reader(data, max_str=limits.max_text_bytes, max_bin=len(data), max_array=0)
    got: dict[str, Any] = {}
    for key in r.keys("body", r.map_header("body", len(_TOP_KEYS)), _TOP_KEYS):
        if key == "v":
            got[key] = r.scalar("v")
            if got[key] != 1:
                raise bad("v", f"unsupported protocol version {got[key]!r} (expected 1)")
        elif key == "device":
            got[key] = r.text("device", 4 * 256)
            if got[key] != device:
                raise Rejected(
                    400,
                    "device_mismatch",
                    "body 'device' does not match the X-Edgepipe-Device header",
                )
        elif key == "status":
            got[key] = _decode_status(r)
        elif key == "batches":
            n = r.array_header("batches", limits.max_batches, "batches")
            got[key] = [r.binary(f"batches[{i}]") for i in range(n)]
        elif key == "dead_letters":
            n = r.array_header("dead_letters", limits.max_dead_letters, "dead letters")
            got[key] = [_decode_dead_letter(r, f"dead_letters[{i}]", limits) for i in range(n)]
        elif key == "health":
            raw = r.binary("health")
            got[key] = decode_health(
                raw, RECORD_LIMITS, ts_min=TS_MIN_MS, ts_max=now + limits.max_future_ms
            )
        else:
            got[key] = decode_logs(
                r, RECORD_LIMITS, ts_min=TS_MIN_MS, ts_max=now + limits.max_future_ms
            )
    r.end("body")
    if got.get("v") != 1:
        raise bad("v", f"unsupported protocol version {got.get('v')!r} (expected 1)")
    if got.get("device") != device:
        raise Rejected(
            400, "device_mismatch", "body 'device' does not match the X-Edgepipe-Device header"
        )
    if "batches" not in got:
        raise bad("batches", "expected an array, found nothing")
    batches = []
    left = limits.max_readings
    for i, raw in enumerate(got["batches"]):
        b = _decode_batch(raw, f"batches[{i}]", limits, left, now)
        left -= len(b)
        batches.append(b)
    batches.sort(key=lambda b: b.seq)
    return Upload(
        device,
        got.get("status", {}),
        batches,
        got.get("dead_letters", []),
        limits,
        got.get("health", []),
        got.get("logs", []),
    )
