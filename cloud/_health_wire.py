"""Decoding of an upload's device records: the ``health`` block (delta-encoded snapshot
columns) and the ``logs`` records (docs/sync-protocol.md, docs/health.md).

Like the rest of the body, every count, length and value is bounded before it is built,
and a malformed, oversized or future-stamped record refuses the whole request with a
``bad_body`` detail that names the place (``health.cols[3][7]: expected an integer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._wire_reader import STR, Reader, bad, name_problem

__all__ = [
    "LOG_LEVELS",
    "HealthSnapshot",
    "LogRecord",
    "RecordLimits",
    "decode_health",
    "decode_logs",
]

LOG_LEVELS = ("WARNING", "ERROR", "CRITICAL")
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True, slots=True)
class RecordLimits:
    max_snapshots: int = 240  # per request
    max_keys: int = 256  # per snapshot block
    max_key_chars: int = 160
    max_text_chars: int = 128  # a text value (the chain hash)
    max_logs: int = 500  # per request
    max_log_chars: int = 512
    max_logger_chars: int = 64


RECORD_LIMITS = RecordLimits()


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    seq: int
    ts: int
    values: dict[str, int | str]


@dataclass(frozen=True, slots=True)
class LogRecord:
    seq: int
    ts: int
    last: int
    level: str
    logger: str
    msg: str
    n: int


def _int(v: Any, where: str, lo: int = _INT64[0], hi: int = _INT64[1]) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(where, f"expected an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise bad(where, f"{v} is out of range ({lo}..{hi})")
    return v


def _undelta(col: list[Any], where: str) -> list[int | None]:
    out: list[int | None] = []
    prev: int | None = None
    for i, d in enumerate(col):
        if d is None:
            out.append(None)
            prev = None
            continue
        d = _int(d, f"{where}[{i}]")
        prev = d if prev is None else prev + d
        if not _INT64[0] <= prev <= _INT64[1]:
            raise bad(f"{where}[{i}]", "the running value leaves the 64-bit range")
        out.append(prev)
    return out


def decode_health(
    raw: bytes, lim: RecordLimits, *, ts_min: int, ts_max: int
) -> list[HealthSnapshot]:
    """The snapshots of one ``health`` block (msgpack ``{"seq", "keys", "cols"}``)."""
    r = Reader(
        raw,
        max_str=4 * max(lim.max_key_chars, lim.max_text_chars),
        max_bin=0,
        max_array=max(lim.max_snapshots, lim.max_keys),
    )
    got: dict[str, Any] = {}
    known = ("seq", "keys", "cols")
    for key in r.keys("health", r.map_header("health", 3), known):
        w = f"health.{key}"
        if key == "seq":
            n = r.array_header(w, lim.max_snapshots, "snapshots")
            got[key] = [_int(r.scalar(f"{w}[{i}]"), f"{w}[{i}]") for i in range(n)]
        elif key == "keys":
            n = r.array_header(w, lim.max_keys, "keys")
            names = []
            for i in range(n):
                name = r.text(f"{w}[{i}]", 4 * lim.max_key_chars) or ""
                problem = name_problem(name, lim.max_key_chars)
                if problem is not None:
                    raise bad(f"{w}[{i}]", f"key {problem}")
                names.append(name)
            if len(set(names)) != len(names):
                raise bad(w, "a key is given twice")
            got[key] = names
        else:
            n = r.array_header(w, lim.max_keys, "columns")
            if "seq" not in got:
                raise bad(w, "expected 'seq' first")
            got[key] = [r.column(f"{w}[{i}]", len(got["seq"])) for i in range(n)]
    r.end("health")
    for key in known:
        if key not in got:
            raise bad("health", f"missing key {key!r}")
    names, cols = got["keys"], got["cols"]
    if len(cols) != len(names):
        raise bad("health.cols", f"{len(cols)} columns for {len(names)} keys")
    if "ts" not in names:
        raise bad("health.keys", "no 'ts' column")
    seqs = _undelta(got["seq"], "health.seq")
    if any(s is None or s < 1 for s in seqs):
        raise bad("health.seq", "expected positive sequence numbers")
    if len(set(seqs)) != len(seqs):
        raise bad("health.seq", "a sequence number is given twice")
    values: list[dict[str, int | str]] = [{} for _ in seqs]
    for name, col, i in zip(names, cols, range(len(names)), strict=True):
        w = f"health.cols[{i}]"
        if any(isinstance(v, str) for v in col):  # a text column: carried forward
            prev: str | None = None
            for j, v in enumerate(col):
                if isinstance(v, str):
                    if len(v) > lim.max_text_chars:
                        raise bad(f"{w}[{j}]", f"text of {len(v)} characters")
                    prev = v
                elif v is not None:
                    raise bad(f"{w}[{j}]", "expected text or nil in a text column")
                if prev is not None:
                    values[j][name] = prev
            continue
        for j, v in enumerate(_undelta(col, w)):
            if v is not None:
                values[j][name] = v
    out = []
    for j, (seq, vals) in enumerate(zip(seqs, values, strict=True)):
        ts = vals.pop("ts", None)
        if not isinstance(ts, int):
            raise bad(f"health snapshot {j}", "has no timestamp")
        if ts < ts_min:
            raise bad(f"health snapshot {j}.ts", f"{ts} is before 2000-01-01")
        if ts > ts_max:
            raise bad(f"health snapshot {j}.ts", f"{ts} is ahead of the receiver's clock")
        out.append(HealthSnapshot(seq, ts, vals))  # type: ignore[arg-type]
    return out


_LOG_KEYS = ("seq", "ts", "last", "level", "logger", "msg", "n")


def decode_logs(r: Reader, lim: RecordLimits, *, ts_min: int, ts_max: int) -> list[LogRecord]:
    """The ``logs`` array of the body, read from the body's reader."""
    n = r.array_header("logs", lim.max_logs, "log records")
    out = []
    for i in range(n):
        where = f"logs[{i}]"
        got: dict[str, Any] = {}
        for key in r.keys(where, r.map_header(where, len(_LOG_KEYS)), _LOG_KEYS):
            w = f"{where}.{key}"
            if key in ("level", "logger", "msg"):
                limit = {"level": 16, "logger": lim.max_logger_chars, "msg": lim.max_log_chars}
                if r.peek(w)[0] != STR:
                    raise bad(w, "expected a string")
                got[key] = r.text(w, 4 * limit[key]) or ""
            else:
                got[key] = _int(r.scalar(w), w, 0)
        for key in _LOG_KEYS:
            if key not in got and key != "last":
                raise bad(where, f"missing key {key!r}")
        if got["level"] not in LOG_LEVELS:
            raise bad(f"{where}.level", f"expected one of {', '.join(LOG_LEVELS)}")
        if got["seq"] < 1 or got["n"] < 1:
            raise bad(where, "seq and n must be positive")
        last = got.get("last", got["ts"])
        for key, t in (("ts", got["ts"]), ("last", last)):
            if t < ts_min or t > ts_max:
                raise bad(f"{where}.{key}", f"{t} is outside 2000-01-01 .. the receiver's clock")
        if last < got["ts"]:
            raise bad(f"{where}.last", "is before ts")
        problem = name_problem(got["logger"], lim.max_logger_chars)
        if problem is not None:
            raise bad(f"{where}.logger", f"logger {problem}")
        msg = got["msg"]
        if len(msg) > lim.max_log_chars:
            msg = msg[: lim.max_log_chars - 1] + "…"
        out.append(
            LogRecord(got["seq"], got["ts"], last, got["level"], got["logger"], msg, got["n"])
        )
    return out
