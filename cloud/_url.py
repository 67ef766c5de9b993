"""Database URLs in messages: the password never shown."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redacted_url"]


def redacted_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
