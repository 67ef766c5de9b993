"""protocol._signing: the canonical request, HMAC signature and constant-time verification."""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import _signing

SECRET = bytes(range(32))
BODY = b"\x28\xb5\x2f\xfd compressed bytes"
ARGS = ("POST", "/v1/batches", 1_700_000_000, "0123456789abcdef0123456789abcdef", BODY)


def test_known_vector() -> None:
    canonical = (
        "EP1\nPOST\n/v1/batches\n1700000000\n0123456789abcdef0123456789abcdef\n"
        + hashlib.sha256(BODY).hexdigest()
    ).encode()
    assert _signing.canonical(*ARGS) == canonical
    expected = "v1=" + hmac.new(SECRET, canonical, hashlib.sha256).hexdigest()
    assert _signing.sign(SECRET, *ARGS) == expected
    assert _signing.verify(SECRET, *ARGS, expected)


@pytest.mark.parametrize("field", range(5))
def test_any_change_breaks_the_signature(field: int) -> None:
    sig = _signing.sign(SECRET, *ARGS)
    changed = list(ARGS)
    changed[field] = {0: "PUT", 1: "/v1/other", 2: ARGS[2] + 1, 3: "f" * 32, 4: BODY + b"!"}[field]
    assert not _signing.verify(SECRET, *changed, sig)
    assert not _signing.verify(b"another secret", *ARGS, sig)


@pytest.mark.parametrize("bad", ["", "v1=", "v2=" + "0" * 64, "v1=" + "0" * 64, "v1=é"])
def test_malformed_signatures_are_refused(bad: str) -> None:
    assert not _signing.verify(SECRET, *ARGS, bad)


def test_signed_headers_and_nonces() -> None:
    h = _signing.signed_headers(
        SECRET, "dev-1", "/v1/batches", BODY, timestamp=ARGS[2], nonce=ARGS[3], link="cellular"
    )
    assert h == {
        "X-Edgepipe-Device": "dev-1",
        "X-Edgepipe-Timestamp": "1700000000",
        "X-Edgepipe-Nonce": ARGS[3],
        "X-Edgepipe-Link": "cellular",
        "X-Edgepipe-Signature": _signing.sign(SECRET, *ARGS),
    }
    nonces = {_signing.new_nonce() for _ in range(100)}
    assert len(nonces) == 100 and all(_signing.is_valid_nonce(n) for n in nonces)
    assert not _signing.is_valid_nonce("A" * 32) and not _signing.is_valid_nonce("a" * 31)


def test_imports_only_the_standard_library() -> None:
    path = Path(_signing.__file__)
    code = (
        "import importlib.util, sys\n"
        "before = set(sys.modules)\n"
        f"spec = importlib.util.spec_from_file_location('s', {str(path)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new - set(sys.stdlib_module_names)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
