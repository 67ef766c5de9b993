"""Request signing for the sync wire protocol v1 (see docs/sync-protocol.md).

Shared by the edge sync worker (which signs) and the cloud receiver (which verifies), so it
uses the standard library only and is cheap to import on the edge.

Signature version 2 (what the edge sends) covers every header that changes how the body is
read, and the body's digest travels in a header, so the receiver authenticates a request
from its headers alone, before it reads (or spends anything on) the body::

    canonical = "EP2\\n" METHOD "\\n" PATH "\\n" timestamp "\\n" nonce "\\n" content-type
                "\\n" content-encoding "\\n" link "\\n" hex(sha256(body))
    X-Edgepipe-Content-SHA256: hex(sha256(body))
    X-Edgepipe-Signature: v2=<hex HMAC-SHA256(device_secret, canonical)>

Version 1 (older devices; the receiver accepts it unless told not to) covers only the body::

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
    "HEADER_DIGEST",
    "HEADER_LINK",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "LINKS",
    "MAX_SKEW_S",
    "SIGNATURE_PREFIX",
    "SIGNATURE_PREFIX_V2",
    "canonical",
    "canonical_v2",
    "is_valid_digest",
    "is_valid_nonce",
    "new_nonce",
    "sign",
    "sign_v2",
    "signed_headers",
    "signed_headers_v2",
    "verify",
    "verify_v2",
]

CONTENT_TYPE = "application/vnd.edgepipe.batches+msgpack"
HEADER_DEVICE = "X-Edgepipe-Device"
HEADER_TIMESTAMP = "X-Edgepipe-Timestamp"
HEADER_NONCE = "X-Edgepipe-Nonce"
HEADER_LINK = "X-Edgepipe-Link"
HEADER_SIGNATURE = "X-Edgepipe-Signature"
HEADER_DIGEST = "X-Edgepipe-Content-SHA256"
SIGNATURE_PREFIX = "v1="
SIGNATURE_PREFIX_V2 = "v2="
LINKS = ("wifi", "cellular", "ethernet", "unknown")
#: A request whose timestamp is further than this from the receiver's clock is stale.
MAX_SKEW_S = 300

_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def new_nonce() -> str:
    """A fresh nonce: 16 random bytes as 32 lowercase hex characters."""
    return os.urandom(16).hex()


def is_valid_nonce(nonce: str) -> bool:
    return _NONCE_RE.fullmatch(nonce) is not None


def is_valid_digest(digest: str) -> bool:
    return _DIGEST_RE.fullmatch(digest) is not None


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


# -- version 2: headers authenticated before the body is read -----------------------------------
def canonical_v2(
    method: str,
    path: str,
    timestamp: int,
    nonce: str,
    content_type: str,
    encoding: str,
    link: str,
    digest: str,
) -> bytes:
    """The exact bytes that are MACed (``digest``: hex SHA-256 of the body as sent)."""
    return (
        f"EP2\n{method.upper()}\n{path}\n{int(timestamp)}\n{nonce}\n{content_type}\n"
        f"{encoding}\n{link}\n{digest}"
    ).encode()


def sign_v2(
    secret: bytes,
    method: str,
    path: str,
    timestamp: int,
    nonce: str,
    content_type: str,
    encoding: str,
    link: str,
    digest: str,
) -> str:
    """The value of the ``X-Edgepipe-Signature`` header (``v2=<hex>``)."""
    msg = canonical_v2(method, path, timestamp, nonce, content_type, encoding, link, digest)
    return SIGNATURE_PREFIX_V2 + hmac.new(secret, msg, hashlib.sha256).hexdigest()


def verify_v2(
    secret: bytes,
    method: str,
    path: str,
    timestamp: int,
    nonce: str,
    content_type: str,
    encoding: str,
    link: str,
    digest: str,
    signature: str,
) -> bool:
    """True if ``signature`` is the valid v2 header value; compared in constant time.  The
    caller checks afterwards that the body it reads has ``digest``."""
    expected = sign_v2(secret, method, path, timestamp, nonce, content_type, encoding, link, digest)
    return hmac.compare_digest(expected.encode(), signature.encode("ascii", "replace"))


def signed_headers_v2(
    secret: bytes,
    device: str,
    path: str,
    body: bytes,
    *,
    timestamp: int,
    encoding: str = "identity",
    nonce: str | None = None,
    link: str = "unknown",
    method: str = "POST",
    content_type: str = CONTENT_TYPE,
) -> dict[str, str]:
    """Every header of one v2-signed request, ``Content-Type`` and ``Content-Encoding``
    included (they are signed, so they must be sent exactly as given)."""
    nonce = nonce or new_nonce()
    digest = hashlib.sha256(body).hexdigest()
    return {
        "Content-Type": content_type,
        "Content-Encoding": encoding,
        HEADER_DEVICE: device,
        HEADER_TIMESTAMP: str(int(timestamp)),
        HEADER_NONCE: nonce,
        HEADER_LINK: link,
        HEADER_DIGEST: digest,
        HEADER_SIGNATURE: sign_v2(
            secret, method, path, timestamp, nonce, content_type, encoding, link, digest
        ),
    }
