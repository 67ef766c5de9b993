"""Errors of the cloud receiver.

Every refusal is a :class:`Rejected` with an HTTP status, a stable machine-readable ``code``
and a ``detail`` for humans; it renders as ``{"error": code, "detail": detail, ...extra}``.
No error ever carries a device secret or an API token.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CloudError", "Rejected", "SequenceConflict", "UnknownDevice"]


class CloudError(Exception):
    """Base of every error the cloud receiver raises on purpose."""


class Rejected(CloudError):
    """A request refused with ``status``; ``code`` is what the rejection log records."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.extra = extra
        super().__init__(f"{status} {code}: {detail}")

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}


class SequenceConflict(Rejected):
    """A batch reuses a stored (device, seq) with different bytes."""

    def __init__(self, device: str, seq: int) -> None:
        self.device, self.seq = device, seq
        super().__init__(
            409,
            "sequence_conflict",
            f"batch seq {seq} of device {device!r} was already stored with different content",
            seq=seq,
        )


class UnknownDevice(CloudError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no device named {name!r}")
