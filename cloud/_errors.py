"""Errors of the cloud receiver.

The storage backend raises domain errors only: they say what is wrong (with the device,
sequence number or operator as fields) and nothing about HTTP.  The app layer maps each of
them to a status and a stable machine-readable code in one place
(:func:`cloud._http_errors.rejection_for`).  A request refused by the HTTP layer itself is a
:class:`Rejected` (status, ``code``, ``detail``); it renders as
``{"error": code, "detail": detail, ...extra}``.  No error ever carries a device secret, the
master key or an API token.

    CloudError
    ├── Rejected              an HTTP request refused (status, code, detail, extra fields)
    ├── UnknownDevice         no device of that name (name)
    ├── UnknownOperator       no operator of that name (name)
    ├── DeviceExists          ``devices add`` of a name in use (name)
    ├── OperatorExists        ``users add`` of a name in use (name)
    ├── UploadRefused         an upload the store refused whole; nothing stored (device)
    │   ├── SequenceConflict  a (device, seq) stored before with other bytes (device, seq)
    │   ├── NonceReplayed     the request's nonce was stored meanwhile (device)
    │   └── SeriesLimitExceeded  it would create too many series (device, scope, limit)
    ├── MasterKeyError        master key missing, unreadable, too permissive or wrong
    ├── NoDatabase            no receiver database where one must exist (url, where)
    ├── BadDatabaseURL        a database URL edgepipe-cloud cannot use (url, reason)
    └── SecretUnreadable      a stored device secret failed authentication (device, key_id)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadDatabaseURL",
    "CloudError",
    "DeviceExists",
    "MasterKeyError",
    "NoDatabase",
    "NonceReplayed",
    "OperatorExists",
    "Rejected",
    "SecretUnreadable",
    "SequenceConflict",
    "SeriesLimitExceeded",
    "UnknownDevice",
    "UnknownOperator",
    "UploadRefused",
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


class UnknownDevice(CloudError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no device named {name!r}")


class UnknownOperator(CloudError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no operator named {name!r}")


class DeviceExists(CloudError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"a device named {name!r} already exists")


class OperatorExists(CloudError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"an operator named {name!r} already exists")


class UploadRefused(CloudError):
    """An upload the store refused as a whole: nothing of it was stored."""

    def __init__(self, device: str, message: str) -> None:
        self.device = device
        super().__init__(message)


class SequenceConflict(UploadRefused):
    """A batch reuses a stored (device, seq) with different bytes."""

    def __init__(self, device: str, seq: int) -> None:
        self.seq = seq
        super().__init__(
            device,
            f"batch seq {seq} of device {device!r} was already stored with different content",
        )


class NonceReplayed(UploadRefused):
    """The request's nonce was stored (by a concurrent request) before this one committed."""

    def __init__(self, device: str) -> None:
        super().__init__(device, "this nonce was already used")


class SeriesLimitExceeded(UploadRefused):
    """The upload would create more series than allowed: in one request (``scope``
    "request") or for the device in all ("device"); ``limit`` is the limit it exceeds."""

    def __init__(self, device: str, scope: str, limit: int) -> None:
        self.scope, self.limit = scope, limit
        if scope == "request":
            msg = f"the upload creates more than {limit} new series (the limit per request)"
        else:
            msg = f"device {device!r} would have more than {limit} series (the limit per device)"
        super().__init__(device, msg)


class MasterKeyError(CloudError):
    """The master key is missing, unreadable, or not the one this database was sealed with."""


class NoDatabase(CloudError):
    """No receiver database at ``url`` (``where``: the file or server it names, without a
    password), for a caller that must not create one."""

    def __init__(self, url: str, where: str, reason: str) -> None:
        self.url, self.where, self.reason = url, where, reason
        super().__init__(f"no edgepipe-cloud database at {where}: {reason}")


class SecretUnreadable(CloudError):
    """A stored device secret failed authentication: modified, or moved from another device."""

    def __init__(self, device: str, key_id: str | None, reason: str) -> None:
        self.device, self.key_id = device, key_id
        super().__init__(f"the stored secret of device {device!r} cannot be used: {reason}")


class BadDatabaseURL(CloudError):
    """A ``--db`` URL edgepipe-cloud cannot use (an unknown scheme, a bad ``?schema=``): a
    usage error, nothing was opened.  ``url`` is shown without its password."""

    def __init__(self, url: str, reason: str) -> None:
        from ._url import redacted_url

        self.url, self.reason = redacted_url(url), reason
        super().__init__(f"database URL {self.url}: {reason}")
