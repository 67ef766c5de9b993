"""Warning-and-above log records of the edge process, collected for the cloud
(docs/health.md).

:class:`LogCollector` is a :class:`logging.Handler`: it keeps WARNING and above in memory,
**de-duplicated** (one record per logger, level and message template, with a count and the
first and last time; a warning repeated 10,000 times is one record with ``n: 10000``),
**rate-limited** (at most :data:`NEW_PER_MINUTE` distinct records a minute, at most
:data:`PENDING_MAX` waiting; what is refused is counted in one ``suppressed`` record) and
**truncated** (:data:`TEXT_MAX` characters).  The sync worker drains it into the store's
sealed ``logs`` ring, from where the records are uploaded with their original timestamps.

Nothing a sensor said is kept in clear by default: arguments that are numbers (values),
mappings (tags) or bytes (payloads) are replaced by ``<redacted>``; the message template,
the logger and text arguments (stage names, trap codes, topics) stay.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

__all__ = ["NEW_PER_MINUTE", "PENDING_MAX", "TEXT_MAX", "LogCollector", "redacted_message"]

#: Longest message text kept (characters).
TEXT_MAX = 512
#: Distinct records (after de-duplication) accepted per minute.
NEW_PER_MINUTE = 60
#: Distinct records waiting to be stored at most.
PENDING_MAX = 256

_REDACTED = "<redacted>"
#: A %-conversion of a log message template (``%d``, ``%.2f``, ``%(name)r``, ``%%``).
_SPEC = re.compile(r"%(\([^)]*\))?[#0\- +]*\d*(?:\.\d+)?[hlL]?([diouxXeEfFgGcrsa%])")


def _as_text(template: str) -> str:
    """``template`` with every conversion made ``%s``: a redacted number is text."""
    return _SPEC.sub(lambda m: "%%" if m[2] == "%" else f"%{m[1] or ''}s", template)


def _safe(arg: Any) -> Any:
    if isinstance(arg, bool) or arg is None:
        return arg
    if isinstance(arg, int | float | complex | bytes | bytearray | memoryview | dict):
        return _REDACTED
    if isinstance(arg, list | tuple | set):
        return _REDACTED
    if isinstance(arg, BaseException):
        return f"{type(arg).__name__}: {arg}"
    return arg


def redacted_message(record: logging.LogRecord, *, redact: bool = True) -> str:
    """The record's message with what could be sensor data replaced (``redact``)."""
    msg = str(record.msg)
    args = record.args
    if not args:
        return msg
    if redact:
        if isinstance(args, dict) and "%(" not in msg:  # one mapping argument (tags, say)
            args = (_REDACTED,)
        elif isinstance(args, dict):
            args = {k: _safe(v) for k, v in args.items()}  # type: ignore[assignment]
        else:
            args = tuple(_safe(a) for a in args)
        msg = _as_text(msg)
    try:
        return msg % args
    except (TypeError, ValueError):
        return f"{msg} {args!r}"


class LogCollector(logging.Handler):
    """Collects WARNING and above, de-duplicated and bounded; :meth:`drain` hands the
    records over (each ``{"ts", "last", "level", "logger", "msg", "n"}``, ``ts`` and
    ``last`` in ms)."""

    def __init__(
        self,
        *,
        level: int = logging.WARNING,
        redact: bool = True,
        per_minute: int = NEW_PER_MINUTE,
        clock: Any = time.time,
    ) -> None:
        super().__init__(level)
        self.redact = redact
        self.per_minute = per_minute
        self._clock = clock
        self._lock_ = threading.Lock()
        self._pending: dict[tuple[str, int, str], dict[str, Any]] = {}
        self._window = (0, 0)  # (minute, new records in it)
        self._suppressed: dict[str, Any] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            now = int(record.created * 1000) if record.created else int(self._clock() * 1000)
            key = (record.name, record.levelno, str(record.msg)[:TEXT_MAX])
            with self._lock_:
                rec = self._pending.get(key)
                if rec is not None:
                    rec["n"] += 1
                    rec["last"] = now
                    return
                minute, new = self._window
                if now // 60_000 != minute:
                    minute, new = now // 60_000, 0
                if new >= self.per_minute or len(self._pending) >= PENDING_MAX:
                    self._suppress(now)
                    return
                self._window = (minute, new + 1)
                text = redacted_message(record, redact=self.redact)
                if record.exc_info and record.exc_info[1] is not None:
                    text += f" ({type(record.exc_info[1]).__name__})"
                if len(text) > TEXT_MAX:
                    text = text[: TEXT_MAX - 1] + "…"
                self._pending[key] = {
                    "ts": now,
                    "last": now,
                    "level": record.levelname,
                    "logger": record.name[:64],
                    "msg": text,
                    "n": 1,
                }
        except Exception:  # a log handler must never raise into the code that logs
            self.handleError(record)

    def _suppress(self, now: int) -> None:
        s = self._suppressed
        if s is None:
            self._suppressed = {
                "ts": now,
                "last": now,
                "level": "WARNING",
                "logger": "edgepipe.logs",
                "msg": "log records suppressed (rate limit of distinct records reached)",
                "n": 1,
            }
        else:
            s["n"] += 1
            s["last"] = now

    def drain(self) -> list[dict[str, Any]]:
        """The records collected since the last drain, oldest first."""
        with self._lock_:
            out = list(self._pending.values())
            if self._suppressed is not None:
                out.append(self._suppressed)
            self._pending, self._suppressed = {}, None
        out.sort(key=lambda r: r["ts"])
        return out
