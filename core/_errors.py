"""Errors raised by edgepipe.

Every error carries structured fields (stage, topic, trap code, path, line ...) and a
message fit for an operator's terminal; none of them ever contains key material.

    EdgepipeError
    ├── ConfigError             a located problem in pipeline.yaml (path, line, col)
    ├── FilterError             a Wasm stage failed (stage, code)
    │   ├── FilterLoadError     refused at load/deploy time (bad ABI, imports, size, hash)
    │   └── FilterRuntimeError  trap, exhausted limit or malformed output (trap_code)
    ├── IngestError             an MQTT connection or subscription problem
    │   └── DecodeError         a payload that can't be decoded (topic, reason)
    ├── StoreError              the local store can't do what was asked
    │   ├── StoreFullError      quota reached or disk full; nothing was written
    │   ├── KeyError_           key missing, unreadable, too permissive or wrong
    │   └── TamperedError       a row failed authentication (table, seq)
    └── SyncError               an upload failed (status, retry_after)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DecodeError",
    "EdgepipeError",
    "FilterError",
    "FilterLoadError",
    "FilterRuntimeError",
    "IngestError",
    "KeyError_",
    "StoreError",
    "StoreFullError",
    "SyncError",
    "TamperedError",
]


class EdgepipeError(Exception):
    """Base of every error edgepipe raises on purpose."""


class ConfigError(EdgepipeError):
    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        col: int | None = None,
    ) -> None:
        self.message, self.path, self.line, self.col = message, path, line, col
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path or "<config>"
        if self.line is not None:
            where += f":{self.line}:{self.col or 1}"
        return f"{where}: {self.message}"


class FilterError(EdgepipeError):
    def __init__(self, message: str, *, stage: str | None = None, code: str | None = None) -> None:
        self.message, self.stage, self.code = message, stage, code
        super().__init__(f"stage {stage!r}: {message}" if stage else message)


class FilterLoadError(FilterError):
    pass


class FilterRuntimeError(FilterError):
    """A stage failed at run time; ``backtrace`` holds the guest's wasm frames of a trap,
    innermost first (``name@0xOFFSET``, the offset in the module), when there is one."""

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        code: str | None = None,
        backtrace: tuple[str, ...] = (),
    ) -> None:
        self.backtrace = backtrace
        super().__init__(message, stage=stage, code=code)

    @property
    def trap_code(self) -> str | None:
        return self.code


class IngestError(EdgepipeError):
    pass


class DecodeError(IngestError):
    def __init__(self, reason: str, *, topic: str | None = None) -> None:
        self.reason, self.topic = reason, topic
        super().__init__(f"{topic}: {reason}" if topic else reason)


class StoreError(EdgepipeError):
    pass


class StoreFullError(StoreError):
    pass


class KeyError_(StoreError):  # noqa: N801 - avoid shadowing the builtin KeyError
    pass


class TamperedError(StoreError):
    def __init__(self, message: str, *, table: str | None = None, seq: int | None = None) -> None:
        self.table, self.seq = table, seq
        super().__init__(message)


class SyncError(EdgepipeError):
    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        self.status, self.retry_after = status, retry_after
        super().__init__(message)
