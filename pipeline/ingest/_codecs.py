"""Sensor payloads -> readings.

Formats (``format:`` of a subscription; ``auto`` sniffs the first byte):

``number``   a plain numeric payload, ``21.5``; device and metric come from the topic.
``json``     an object ``{"ts": 1700000000, "value": 21.5}`` (metric from the topic), or
             several metrics in one object ``{"ts": ..., "temp": 21.5, "rh": 40}``, or a
             list of such objects.  Optional ``"device"``, ``"tags": {...}``, ``"seq"``.
``msgpack``  the same structures as JSON, MessagePack-encoded.
``senml``    SenML JSON (RFC 8428): base name/time/value resolution, relative times.

Timestamps from the payload may be epoch seconds, epoch milliseconds or ISO 8601
strings; without one (or with ``timestamp: arrival``) the arrival time is used.

Every problem raises :class:`DecodeError` with a reason; the caller dead-letters the
message with its raw bytes, counts the reason and still acknowledges it.
"""

from __future__ import annotations

import json
import json.scanner
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgpack

from config._models import SubscriptionConfig
from core._errors import DecodeError

from ._names import check_tag

__all__ = ["TopicTemplate", "decode_payload", "object_rows", "parse_timestamp", "simple_json"]

# Readings must fall between 2000-01-01 and 2100-01-01 (milliseconds).
_TS_MIN = 946_684_800_000
_TS_MAX = 4_102_444_800_000
#: A payload may be stamped at most this far ahead of its arrival (a sensor's wrong clock).
_AHEAD_MS = 86_400_000
#: Largest magnitude of a value (the cloud receiver's bound: no aggregate can overflow).
_MAX_ABS = 1e250
_json_decode = json.JSONDecoder().decode
#: the C scanner behind ``JSONDecoder.decode``, called straight (decode would add two
#: Python frames and a regex match per payload); errors are reported by ``_json_decode``
_json_scan = json.scanner.make_scanner(json.JSONDecoder())
_RESERVED = frozenset({"ts", "time", "timestamp", "t", "seq", "id", "device", "tags", "value", "v"})

# (device or None, metric or None, ts_ms, value, tags or None)
Row = tuple[str | None, str | None, int, float, dict[str, str] | None]


class TopicTemplate:
    """``sensors/{device}/{metric}`` -> the MQTT filter ``sensors/+/+`` and a matcher."""

    __slots__ = ("template", "filter", "levels", "share_prefix")

    def __init__(self, template: str) -> None:
        self.template = template
        share = ""
        body = template
        if body.startswith("$share/"):
            parts = body.split("/", 2)
            if len(parts) < 3 or not parts[1]:
                raise ValueError("a shared subscription is '$share/GROUP/topic'")
            share, body = f"$share/{parts[1]}/", parts[2]
        self.share_prefix = share
        self.levels: list[str] = body.split("/")
        out = []
        for i, level in enumerate(self.levels):
            if level.startswith("{") and level.endswith("}"):
                if level not in ("{device}", "{metric}"):
                    raise ValueError(f"unknown placeholder {level}; use {{device}} or {{metric}}")
                out.append("+")
            elif level == "#" and i != len(self.levels) - 1:
                raise ValueError("'#' must be the last level")
            else:
                out.append(level)
        self.filter = share + "/".join(out)

    def match(self, topic: str) -> tuple[str | None, str | None] | None:
        """(device, metric) from ``topic``, or None if the topic does not match."""
        parts = topic.split("/")
        levels = self.levels
        device = metric = None
        if levels and levels[-1] == "#":
            if len(parts) < len(levels) - 1:
                return None
        elif len(parts) != len(levels):
            return None
        for level, part in zip(levels, parts, strict=False):
            if level == "#":
                break
            if level == "+":
                continue
            if level == "{device}":
                device = part
            elif level == "{metric}":
                metric = part
            elif level != part:
                return None
        return device, metric


def parse_timestamp(v: Any) -> int:
    """Epoch seconds, epoch milliseconds or ISO 8601 -> milliseconds since the epoch."""
    if type(v) is float and -1e15 < v < 1e15:  # the common case: finite, not a bool
        ms = int(v) if v >= 1e11 or v <= -1e11 else int(round(v * 1000))
        if _TS_MIN <= ms < _TS_MAX:
            return ms
    if isinstance(v, bool):
        raise DecodeError("timestamp is a boolean")
    if isinstance(v, int | float):
        if not math.isfinite(v):
            raise DecodeError("timestamp is not finite")
        ms = int(v) if abs(v) >= 1e11 else int(round(v * 1000))
    elif isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.strip())
        except ValueError:
            raise DecodeError(f"timestamp {v[:40]!r} is not ISO 8601") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ms = int(dt.timestamp() * 1000)
    else:
        raise DecodeError(f"timestamp has type {type(v).__name__}")
    if not _TS_MIN <= ms < _TS_MAX:
        raise DecodeError(f"timestamp {v!r} is outside 2000..2100")
    return ms


def _number(v: Any, what: str) -> float:
    if type(v) is float and -_MAX_ABS <= v <= _MAX_ABS:  # finite and in range (not NaN)
        return v
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise DecodeError(f"{what} is not a number ({type(v).__name__})")
    try:
        f = float(v)
    except OverflowError:
        raise DecodeError(f"{what} is not finite") from None
    if not math.isfinite(f):
        raise DecodeError(f"{what} is not finite")
    if abs(f) > _MAX_ABS:
        raise DecodeError(f"value out of range: {what} is {f:.3g} (limit +-1e250)")
    return f


def _arrival(arrival: int) -> int:
    """The arrival time as a reading's timestamp: only from a clock that is set."""
    if not _TS_MIN <= arrival < _TS_MAX:
        raise DecodeError(f"device clock not set: arrival time {arrival} is outside 2000..2100")
    return arrival


def _not_ahead(ts: int, arrival: int) -> int:
    if ts > arrival + _AHEAD_MS and _TS_MIN <= arrival:
        raise DecodeError(
            f"timestamp in the future: {ts} is more than 24 h after the arrival time {arrival}"
        )
    return ts


def _tags(v: Any) -> dict[str, str] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise DecodeError("tags must be an object")
    if len(v) > 32:
        raise DecodeError("more than 32 tags")
    tags = {str(k)[:64]: str(val)[:256] for k, val in v.items()}
    for k, val in tags.items():
        check_tag(k, val)
    return tags


def _object_rows(
    obj: dict[str, Any],
    metric: str | None,
    arrival: int,
    sub: SubscriptionConfig,
    out: list[Row],
) -> None:
    """Append the readings of one object to ``out`` (per payload: no generator, and the
    common float timestamp and value checked inline)."""
    ts_field = sub.timestamp_field
    raw_ts = obj.get(ts_field)
    if raw_ts is None:
        raw_ts = obj.get("timestamp", obj.get("time"))
    if raw_ts is not None and sub.timestamp == "payload":
        # parse_timestamp's common case inline: epoch seconds as a float
        if type(raw_ts) is float and 1e8 < raw_ts < 1e11:
            ts = round(raw_ts * 1000)
            if not _TS_MIN <= ts < _TS_MAX:
                ts = parse_timestamp(raw_ts)
        else:
            ts = parse_timestamp(raw_ts)
        if ts > arrival + _AHEAD_MS:
            _not_ahead(ts, arrival)
    else:
        ts = _arrival(arrival)
    device = obj.get("device")
    if device is not None and type(device) is not str:
        raise DecodeError("device must be a string")
    tags = obj.get("tags")
    if tags is not None:
        tags = _tags(tags)
    if "value" in obj or "v" in obj:
        value = obj["value"] if "value" in obj else obj["v"]
        m = obj.get("metric", metric)
        if not isinstance(m, str) or not m:
            raise DecodeError("no metric: neither the topic nor the payload names one")
        if not (type(value) is float and -_MAX_ABS <= value <= _MAX_ABS):
            value = _number(value, "value")
        out.append((device, m, ts, value, tags))
        return
    found = False
    id_field = sub.id_field
    for key, value in obj.items():
        if key in _RESERVED or key == ts_field or key == "metric" or key == id_field:
            continue
        if not key:
            raise DecodeError("a metric field has an empty name")
        if not (type(value) is float and -_MAX_ABS <= value <= _MAX_ABS):
            value = _number(value, f"field {key!r}")
        out.append((device, str(key), ts, value, tags))
        found = True
    if not found:
        raise DecodeError("object has no numeric metric fields")


def object_rows(
    obj: dict[str, Any], metric: str | None, arrival: int, sub: SubscriptionConfig
) -> list[Row]:
    """The readings of a JSON or MessagePack object, as :func:`decode_payload` gives them."""
    out: list[Row] = []
    _object_rows(obj, metric, arrival, sub, out)
    return out


def simple_json(payload: bytes, ts_field: str, arrival: int) -> tuple[int, float] | Any:
    """The common payload in one call: a JSON object with a float ``"value"`` and float
    epoch seconds under ``ts_field``, and no ``device``, ``metric`` or ``tags`` of its own
    -> ``(ts_ms, value)``, exactly what :func:`decode_payload` makes of it with the topic's
    device and metric (for a subscription of format json or auto, timestamps from the
    payload).  Another JSON object -> the dict (for :func:`object_rows`); anything else
    (not one JSON object, not UTF-8) -> None, and :func:`decode_payload` says why."""
    try:
        text = payload.decode()
        data, end = _json_scan(text, 0)
    except (ValueError, StopIteration, RecursionError):
        return None
    if end != len(text) and text[end:].strip(" \t\n\r"):
        return None
    if type(data) is not dict:
        return None
    value = data.get("value")
    t = data.get(ts_field)
    if (
        type(value) is float
        and -_MAX_ABS <= value <= _MAX_ABS
        and type(t) is float
        and 1e8 < t < 1e11
        and "device" not in data
        and "metric" not in data
        and "tags" not in data
    ):
        ts = round(t * 1000)
        if _TS_MIN <= ts < _TS_MAX and ts <= arrival + _AHEAD_MS:
            return ts, value
    return data


def _structured_rows(
    data: Any,
    metric: str | None,
    arrival: int,
    sub: SubscriptionConfig,
) -> list[Row]:
    out: list[Row] = []
    if type(data) is dict:
        _object_rows(data, metric, arrival, sub, out)
    elif isinstance(data, list):
        if not data:
            raise DecodeError("empty list")
        if len(data) > 10_000:
            raise DecodeError("more than 10000 readings in one message")
        for item in data:
            if not isinstance(item, dict):
                raise DecodeError("a list must hold objects")
            _object_rows(item, metric, arrival, sub, out)
    elif isinstance(data, dict):  # a dict subclass (never from json or msgpack)
        _object_rows(data, metric, arrival, sub, out)
    elif isinstance(data, int | float) and not isinstance(data, bool):
        if metric is None:
            raise DecodeError("no metric: neither the topic nor the payload names one")
        out.append((None, metric, _arrival(arrival), _number(data, "value"), None))
    else:
        raise DecodeError(f"payload is a {type(data).__name__}, expected an object")
    return out


def _senml_rows(data: Any, arrival: int) -> Iterator[Row]:
    if not isinstance(data, list) or not data:
        raise DecodeError("SenML must be a non-empty array of records")
    bn, bt, bv = "", 0.0, 0.0
    now_s = arrival / 1000.0
    for rec in data:
        if not isinstance(rec, dict):
            raise DecodeError("SenML records must be objects")
        if "bn" in rec:
            if not isinstance(rec["bn"], str):
                raise DecodeError("SenML bn must be a string")
            bn = rec["bn"]
        if "bt" in rec:
            bt = _number(rec["bt"], "SenML bt")
        if "bv" in rec:
            bv = _number(rec["bv"], "SenML bv")
        n = rec.get("n", "")
        if not isinstance(n, str):
            raise DecodeError("SenML n must be a string")
        if "v" not in rec:
            if any(k in rec for k in ("vs", "vb", "vd", "s")):
                continue  # string/bool/data values carry no numeric reading
            if "bn" in rec or "bt" in rec or "bv" in rec:
                continue  # a record that only sets base fields
            raise DecodeError("SenML record without a value")
        value = bv + _number(rec["v"], "SenML v")
        t = bt + (_number(rec["t"], "SenML t") if "t" in rec else 0.0)
        if t < 2**28:  # RFC 8428 4.5.3: relative to now
            t = now_s + t
        name = bn + n
        if not name:
            raise DecodeError("SenML record has no name")
        device, metric = _split_senml_name(bn, n)
        ts = _not_ahead(parse_timestamp(t), arrival)
        yield device, metric, ts, _number(value, "SenML value"), None


def _split_senml_name(bn: str, n: str) -> tuple[str | None, str]:
    if bn and n:
        return bn.rstrip(":/") or None, n
    name = bn + n
    for sep in (":", "/"):
        if sep in name.rstrip(sep):
            dev, _, met = name.rstrip(sep).rpartition(sep)
            return dev, met
    return None, name


def decode_payload(
    payload: bytes,
    sub: SubscriptionConfig,
    metric: str | None,
    arrival: int,
) -> list[Row]:
    """All readings in one payload, or DecodeError."""
    fmt = sub.format
    if fmt == "auto":
        fmt = "json" if payload[:1] == b"{" else _sniff(payload)
    try:
        if fmt == "json":
            data = _json(payload)
            if type(data) is dict:  # the common case, one call less
                out: list[Row] = []
                _object_rows(data, metric, arrival, sub, out)
                return out
            if sub.format == "auto" and type(data) is list and _looks_senml(data):
                return _senml_list(data, arrival)
            return _structured_rows(data, metric, arrival, sub)
        if fmt == "number":
            try:
                value = float(payload)
            except ValueError:
                raise DecodeError("payload is not a number") from None
            value = _number(value, "value")
            if metric is None:
                raise DecodeError("no metric: neither the topic nor the payload names one")
            return [(None, metric, _arrival(arrival), value, None)]
        if fmt == "senml":
            return _senml_list(_json(payload), arrival)
        if fmt == "msgpack":
            try:
                # unpackb bounds every container by the input length already
                data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            except Exception as e:
                raise DecodeError(f"invalid MessagePack: {type(e).__name__}: {e}"[:120]) from None
            return _structured_rows(data, metric, arrival, sub)
    except RecursionError:
        raise DecodeError("payload nests too deeply") from None
    raise DecodeError(f"unknown format {fmt!r}")  # pragma: no cover


def _json(payload: bytes) -> Any:
    """The JSON value of ``payload`` (UTF-8; whitespace around it allowed), or DecodeError
    with json's own message."""
    try:
        # bytes.decode, not json.loads, which would sniff the encoding first
        text = payload.decode()
        if text and text[0] not in " \t\n\r":
            try:
                data, end = _json_scan(text, 0)
            except StopIteration:
                pass  # _json_decode raises the error with its message
            else:
                if end == len(text) or text[end:].strip(" \t\n\r") == "":
                    return data
        return _json_decode(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise DecodeError(f"invalid JSON: {e}") from None


def _senml_list(data: Any, arrival: int) -> list[Row]:
    rows = list(_senml_rows(data, arrival))
    if not rows:
        raise DecodeError("SenML pack has no numeric values")
    return rows


_MSGPACK_HEADS = frozenset(range(0x80, 0xA0)) | {0xDC, 0xDD, 0xDE, 0xDF}  # maps and arrays


def _sniff(payload: bytes) -> str:
    head = payload.lstrip()[:1]
    if not head:
        raise DecodeError("empty payload")
    if head in b'{["tfn':
        return "json"
    if head in b"0123456789-+.":
        try:
            float(payload)
            return "number"
        except ValueError:
            return "json"
    if payload[0] in _MSGPACK_HEADS:
        return "msgpack"
    raise DecodeError("unknown format: neither JSON, MessagePack (map or array) nor a number")


def _looks_senml(data: Any) -> bool:
    return (
        isinstance(data, list)
        and bool(data)
        and isinstance(data[0], dict)
        and any(k in data[0] for k in ("bn", "n", "bt"))
        and ("v" in data[0] or "bn" in data[0] or "n" in data[0])
    )
