"""schemathesis against the receiver's own OpenAPI document (``/openapi.json`` of a real
``edgepipe-cloud serve`` on loopback): every operation, with the operator's bearer token
and, for uploads, a device signature (v2) computed over each generated body.  Checks: no
5xx, every status declared, and every answer conforms to its schema.

The body of ``POST /v1/batches`` is drawn from :func:`uploads`: genuine uploads of random
readings, series, tags and dead letters (some stored, some refused by a limit), and the same
with one field broken, so that the decoder, the store and the read endpoints all see what a
device can send.  The run here is short (``MAX_EXAMPLES`` per operation); the longer one is
in docs/security.md ("Fuzzing").
"""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import schemathesis
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from protocol import _signing
from tests.helpers.sync_env import Receiver

TOKEN = "fuzz-operator-token"
DEVICE = "fuzz-edge"
MEDIA = _signing.CONTENT_TYPE
MAX_EXAMPLES = int(os.environ.get("EDGEPIPE_FUZZ_API_EXAMPLES", "25"))
T0 = 1_700_000_000_000

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

# -- bodies ---------------------------------------------------------------------------------
_ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
_hostile_names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12
) | st.sampled_from(["", "a\u0000b", "\u202etxt", "e\u0301", "x" * 300])
_good_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_./é", min_size=1, max_size=10)
_good_values = st.floats(-1e250, 1e250, allow_nan=False) | st.integers(-(2**53), 2**53)
_hostile_values = st.floats() | _ints
_good_ts = st.integers(T0 - 10**9, T0 + 10**9)


_HOSTILE = {"on": False}  # set per upload by :func:`uploads`


def _mostly(draw: st.DrawFn, good: st.SearchStrategy, hostile: st.SearchStrategy) -> Any:
    """A value from ``good``; in a hostile upload, one time in ten from ``hostile``."""
    return draw(hostile if _HOSTILE["on"] and draw(st.integers(0, 9)) == 0 else good)


@st.composite
def _batch(draw: st.DrawFn, seq: int) -> bytes:
    nseries = draw(st.integers(1, 4))
    series = [
        [
            _mostly(draw, _good_names, _hostile_names),
            _mostly(draw, _good_names, _hostile_names),
            draw(st.none() | st.dictionaries(_good_names, _good_names, max_size=3))
            if not _HOSTILE["on"] or draw(st.integers(0, 9))
            else draw(st.dictionaries(_hostile_names, _hostile_names, max_size=3)),
        ]
        for _ in range(nseries)
    ]
    n = draw(st.integers(0, 20))
    body: dict[str, Any] = {
        "seq": seq,
        "series": series,
        "sid": [_mostly(draw, st.integers(0, nseries - 1), _ints) for _ in range(n)],
        "ts": [_mostly(draw, _good_ts, _ints) for _ in range(n)],
        "val": [_mostly(draw, _good_values, _hostile_values) for _ in range(n)],
        "flags": [_mostly(draw, st.integers(0, 2**32 - 1), _ints) for _ in range(n)],
    }
    if _HOSTILE["on"] and draw(st.integers(0, 9)) == 0:  # one field broken or dropped
        key = draw(st.sampled_from(sorted(body)))
        if draw(st.booleans()):
            del body[key]
        else:
            body[key] = draw(st.none() | _ints | st.text(max_size=4) | st.just([[1]]))
    return msgpack.packb(body, use_bin_type=True)


@st.composite
def uploads(draw: st.DrawFn) -> bytes:
    """The msgpack bytes of an upload by :data:`DEVICE` (uncompressed): mostly valid, now
    and then with a field, a name, a value or the framing broken."""
    _HOSTILE["on"] = draw(st.integers(0, 2)) == 0
    first = draw(st.integers(0, 2**20))
    batches = [draw(_batch(first + i)) for i in range(draw(st.integers(0, 3)))]
    top: dict[str, Any] = {
        "v": 1,
        "device": DEVICE,
        "status": {
            "backlog_batches": draw(st.integers(0, 10)),
            "backlog_readings": draw(st.integers(0, 1000)),
            "oldest_unsynced_ms": draw(st.none() | st.integers(0, T0)),
            "dead_letters": draw(st.integers(0, 10)),
            "link": draw(st.sampled_from(["wifi", "cellular", ""])),
        },
        "batches": batches,
    }
    if draw(st.booleans()):
        top["dead_letters"] = [
            {
                "seq": draw(st.integers(0, 2**40)),
                "ts": draw(_good_ts),
                "topic": _mostly(draw, _good_names, _hostile_names),
                "stage": draw(st.none() | _good_names | _hostile_names),
                "reason": _mostly(draw, _good_names, _hostile_names),
                "size": draw(st.integers(0, 2**31)),
            }
            for _ in range(draw(st.integers(0, 2)))
        ]
    if _HOSTILE["on"] and draw(st.integers(0, 3)) == 0:  # a top-level field broken
        key = draw(st.sampled_from(sorted(top)))
        top[key] = draw(st.none() | _ints | st.text(max_size=4) | st.binary(max_size=8))
    raw = msgpack.packb(top, use_bin_type=True)
    if _HOSTILE["on"] and draw(st.integers(0, 5)) == 0:  # cut short, or a stray byte
        raw = raw[: draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=2))
    return raw


schemathesis.openapi.media_type(MEDIA, uploads())


def _encode(body: bytes, encoding: str) -> bytes:
    if encoding == "zstd":
        return zstandard.ZstdCompressor().compress(body)
    if encoding == "gzip":
        return gzip.compress(body)
    return body


class EdgepipeAuth:
    """The operator's bearer token on the read API; a v2 device signature over each
    generated upload (compressed as its generated ``Content-Encoding`` says)."""

    secret = b""

    def get(self, case: Any, ctx: Any) -> bytes:
        return self.secret

    def set(self, case: Any, secret: bytes, ctx: Any) -> None:
        headers = case.headers if isinstance(case.headers, dict) else {}
        if case.operation.path != "/v1/batches":
            headers["Authorization"] = f"Bearer {TOKEN}"
            case.headers = headers
            return
        encoding = headers.get("Content-Encoding") or "identity"
        if encoding not in ("identity", "gzip", "zstd"):
            encoding = "identity"
        body = case.body if isinstance(case.body, bytes) else b""
        sent = _encode(body, encoding)
        headers.update(
            _signing.signed_headers_v2(
                secret,
                DEVICE,
                "/v1/batches",
                sent,
                timestamp=int(time.time()),
                encoding=encoding,
                link=headers.get(_signing.HEADER_LINK) or "wifi",
            )
        )
        case.headers = headers
        case.body = sent
        case.media_type = MEDIA


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    env = {
        "EDGEPIPE_CLOUD_API_TOKEN": TOKEN,
        # uploads come back to back from one device: the rate limit is not under test here
        "EDGEPIPE_CLOUD_DEVICE_UPLOADS_PER_S": "100000",
        "EDGEPIPE_CLOUD_DEVICE_UPLOAD_BURST": "100000",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        rx = Receiver(tmp_path_factory.mktemp("fuzz-api"))
        EdgepipeAuth.secret = bytes.fromhex(rx.add_device(DEVICE))
        with rx:
            yield rx
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def api_schema(receiver: Receiver) -> Any:
    schema = schemathesis.openapi.from_url(receiver.url + "/openapi.json")
    schema.auth()(EdgepipeAuth)
    return schema


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every operation the receiver serves under /v1 and /openapi.json."""
    from starlette.routing import Route

    from cloud import api_routes

    return sorted(  # uploads first: the read endpoints then have data to serve
        (
            (m, r.path)
            for r in api_routes()
            if isinstance(r, Route)
            for m in sorted(r.methods or ())
            if m != "HEAD"
        ),
        key=lambda op: (op[0] != "POST", op[1]),
    )


@pytest.mark.parametrize(("method", "path"), _operations())
def test_every_operation_answers_as_documented(
    method: str, path: str, api_schema: Any, receiver: Receiver
) -> None:
    operation = api_schema[path][method]
    examples = MAX_EXAMPLES * (3 if method == "POST" else 1)

    @given(case=operation.as_strategy(), known=st.booleans())
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: Any, known: bool) -> None:
        if known:  # half the reads ask about the device that uploads, not a random name
            if case.path_parameters and "name" in case.path_parameters:
                case.path_parameters["name"] = DEVICE
            if isinstance(case.query, dict) and "device" in case.query:
                case.query["device"] = DEVICE
        case.call_and_validate(base_url=receiver.url, checks=CHECKS, timeout=60)

    run()


def test_uploads_reached_the_store_and_the_log_holds_no_traceback(receiver: Receiver) -> None:
    """Run after the operations: signed uploads were stored and refused (so the signing
    worked and the decoder was reached), and nothing made the receiver log a traceback."""
    counts = receiver.counts()
    assert counts["batches"] > 0 and counts["readings"] > 0, counts
    assert counts["rejections"] > 0, counts
    log = Path(receiver.log).read_text()
    assert "Traceback" not in log, log[-4000:]
