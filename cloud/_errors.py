"""Errors of the cloud receiver.

Every refusal is a :class:`Rejected` with an HTTP status, a stable machine-readable ``code``
and a ``detail`` for humans; it renders as ``{"error": code, "detail": detail, ...extra}``.
No error ever carries a device secret, the master key or an API token.

    CloudError
    ├── Rejected              a request refused (status, code, detail)
    │   └── SequenceConflict  a (device, seq) stored before with other bytes: 409 (device, seq)
    ├── UnknownDevice         no device of that name (name)
    ├── DeviceExists          ``devices add`` of a name in use (name)
    ├── OperatorExists        ``users add`` of a name in use (name)
    ├── MasterKeyError        master key missing, unreadable, too permissive or wrong
    └── SecretUnreadable      a stored device secret failed authentication (device, key_id)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CloudError",
    "DeviceExists",
    "MasterKeyError",
    "OperatorExists",
    "Rejected",
    "SecretUnreadable",
    "SequenceConflict",
    "UnknownDevice",
]


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


class DeviceExists(CloudError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"a device named {name!r} already exists")


class OperatorExists(CloudError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"an operator named {name!r} already exists")


class MasterKeyError(CloudError):
    """The master key is missing, unreadable, or not the one this database was sealed with."""


class SecretUnreadable(CloudError):
    """A stored device secret failed authentication: modified, or moved from another device."""

    def __init__(self, device: str, key_id: str | None, reason: str) -> None:
        self.device, self.key_id = device, key_id
        super().__init__(f"the stored secret of device {device!r} cannot be used: {reason}")
