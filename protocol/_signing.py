"""Request signing for the sync wire protocol v1 (see docs/sync-protocol.md).

Shared by the edge sync worker (which signs) and the cloud receiver (which verifies), so it
uses the standard library only and is cheap to import on the edge.

    canonical = "EP1\\n" METHOD "\\n" PATH "\\n" timestamp "\\n" nonce "\\n" hex(sha256(body))
    X-Edgepipe-Signature: v1=<hex HMAC-SHA256(device_secret, canonical)>

``body`` is the body *as sent* (i.e. after compression).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

__all__ = [
    "CONTENT_TYPE",
    "HEADER_DEVICE",
    "HEADER_LINK",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "LINKS",
    "MAX_SKEW_S",
    "SIGNATURE_PREFIX",
    "canonical",
    "is_valid_nonce",
    "new_nonce",
    "sign",
    "signed_headers",
    "verify",
]

CONTENT_TYPE = "application/vnd.edgepipe.batches+msgpack"
HEADER_DEVICE = "X-Edgepipe-Device"
HEADER_TIMESTAMP = "X-Edgepipe-Timestamp"
HEADER_NONCE = "X-Edgepipe-Nonce"
HEADER_LINK = "X-Edgepipe-Link"
HEADER_SIGNATURE = "X-Edgepipe-Signature"
SIGNATURE_PREFIX = "v1="
LINKS = ("wifi", "cellular", "ethernet", "unknown")
#: A request whose timestamp is further than this from the receiver's clock is stale.
MAX_SKEW_S = 300

_NONCE_RE = re.compile(r"[0-9a-f]{32}")


def new_nonce() -> str:
    """A fresh nonce: 16 random bytes as 32 lowercase hex characters."""
    return os.urandom(16).hex()


def is_valid_nonce(nonce: str) -> bool:
    return _NONCE_RE.fullmatch(nonce) is not None


def canonical(method: str, path: str, timestamp: int, nonce: str, body: bytes) -> bytes:
    """The exact bytes that are MACed."""
    digest = hashlib.sha256(body).hexdigest()
    return f"EP1\n{method.upper()}\n{path}\n{int(timestamp)}\n{nonce}\n{digest}".encode()


def sign(secret: bytes, method: str, path: str, timestamp: int, nonce: str, body: bytes) -> str:
    """The value of the ``X-Edgepipe-Signature`` header (``v1=<hex>``)."""
    mac = hmac.new(secret, canonical(method, path, timestamp, nonce, body), hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def verify(
    secret: bytes,
    method: str,
    path: str,
    timestamp: int,
    nonce: str,
    body: bytes,
    signature: str,
) -> bool:
    """True if ``signature`` is the valid header value; compared in constant time."""
    expected = sign(secret, method, path, timestamp, nonce, body)
    return hmac.compare_digest(expected.encode(), signature.encode("ascii", "replace"))


def signed_headers(
    secret: bytes,
    device: str,
    path: str,
    body: bytes,
    *,
    timestamp: int,
    nonce: str | None = None,
    link: str = "unknown",
    method: str = "POST",
) -> dict[str, str]:
    """The protocol headers (except Content-Type/-Encoding) for one signed request."""
    nonce = nonce or new_nonce()
    return {
        HEADER_DEVICE: device,
        HEADER_TIMESTAMP: str(int(timestamp)),
        HEADER_NONCE: nonce,
        HEADER_LINK: link,
        HEADER_SIGNATURE: sign(secret, method, path, timestamp, nonce, body),
    }
