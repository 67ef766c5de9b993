"""Uploads the receiver must refuse, and HTTPS with a custom CA.

Each refusal: nothing stored at the receiver, the batches stay unsynced at the edge (the
device keeps its data), the error is clear, and no secret appears in logs or status.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from core._clock import ManualClock
from tests.helpers.pki import TestCA
from tests.helpers.proxy import Proxy
from tests.helpers.sync_env import Receiver, WorkerThread, fill_sync, sync_cfg, unsynced, wait_until

DEVICE = "edge-1"  # registered by the receiver fixture (conftest.py)


def _no_secret_anywhere(caplog: pytest.LogCaptureFixture, tmp: Path, *secrets: str) -> None:
    """What the operator sees of the worker (its log lines, the state file behind
    ``edgepipe status``) never shows a secret: here the log text itself is what is checked."""
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    state = (tmp / "store.db.sync.json").read_text()
    for s in secrets:
        assert s not in text
        assert s not in state
        assert s.upper() not in text


def _refused_and_kept(w: WorkerThread, receiver: Receiver, tmp: Path, batches: int) -> str:
    wait_until(lambda: w.worker.status.last_error, 20, "a refused upload")
    err = w.worker.status.last_error
    assert receiver.counts()["readings"] == 0
    assert unsynced(tmp)[0] == batches
    return err


def test_wrong_secret(tmp_path: Path, receiver: Receiver, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    fill_sync(tmp_path, 3, 100)
    wrong = "ab" * 32
    with WorkerThread(tmp_path, sync_cfg(receiver.url, wrong)) as w:
        err = _refused_and_kept(w, receiver, tmp_path, 3)
    assert "401" in err and "bad_signature" in err
    assert receiver.rejection_reasons() == []  # not the device: counted, never logged per request
    _no_secret_anywhere(caplog, tmp_path, wrong, receiver.secret)


def test_forged_request_is_refused_then_delivered_once(tmp_path: Path, receiver: Receiver) -> None:
    total = fill_sync(tmp_path, 3, 100)
    with Proxy(("127.0.0.1", receiver.port)) as proxy:
        proxy.tamper(1)
        cfg = sync_cfg(proxy.url, receiver.secret, backoff_min_s=1.0)
        with WorkerThread(tmp_path, cfg) as w:
            wait_until(lambda: w.worker.status.last_error, 20, "the forged upload refused")
            assert "bad_signature" in w.worker.status.last_error
            wait_until(lambda: receiver.counts()["readings"] == total, 30, "the honest retry")
            wait_until(lambda: unsynced(tmp_path) == (0, 0), 20, "edge marks synced")
        assert proxy.requests_tampered == 1
    c = receiver.counts()
    assert c["readings"] == c["distinct"] == total
    assert receiver.rejection_reasons() == []  # the tampered request was not the device's


def test_replayed_request_is_refused(tmp_path: Path, receiver: Receiver) -> None:
    total = fill_sync(tmp_path, 2, 100)
    with Proxy(("127.0.0.1", receiver.port)) as proxy:
        with WorkerThread(tmp_path, sync_cfg(proxy.url, receiver.secret)):
            wait_until(lambda: unsynced(tmp_path) == (0, 0), 20, "the upload")
        raw = proxy.captured()[0]
    assert raw.startswith(b"POST /v1/batches")
    with socket.create_connection(("127.0.0.1", receiver.port)) as s:
        s.sendall(raw)
        status_line = s.recv(4096).split(b"\r\n", 1)[0]
    assert b" 401 " in status_line + b" "
    c = receiver.counts()
    assert c["readings"] == c["distinct"] == total
    assert "replay" in receiver.rejection_reasons()


def test_stale_timestamp(tmp_path: Path, receiver: Receiver) -> None:
    fill_sync(tmp_path, 2, 100)
    cfg = sync_cfg(receiver.url, receiver.secret)
    with WorkerThread(tmp_path, cfg, clock=ManualClock(time.time() - 3600)) as w:
        err = _refused_and_kept(w, receiver, tmp_path, 2)
    assert "401" in err and "stale" in err
    assert "stale" in receiver.rejection_reasons()


def test_oversized_body(tmp_path: Path) -> None:
    r = Receiver(tmp_path, extra=["--max-body-mb", "0.002"])  # ~2 KB
    secret = r.add_device(DEVICE)
    with r:
        fill_sync(tmp_path, 2, 1000)
        cfg = sync_cfg(r.url, secret, compression="none")
        with WorkerThread(tmp_path, cfg) as w:
            err = _refused_and_kept(w, r, tmp_path, 2)
            # it halves its requests and keeps trying; still nothing fits, nothing lost
            wait_until(lambda: w.worker._max_batches == 1, 20, "smaller requests")
        assert "413" in err and "too_large" in err
        assert "too_large" in r.rejection_reasons()
        assert unsynced(tmp_path) == (2, 2000)


# -- HTTPS ---------------------------------------------------------------------------------
@pytest.fixture
def tls_receiver(tmp_path: Path):
    ca = TestCA(tmp_path, "edgepipe-test-ca")
    cert, key = ca.issue("server")
    r = Receiver(tmp_path, extra=["--tls-cert", str(cert), "--tls-key", str(key)], ca=ca.path)
    r.secret = r.add_device(DEVICE)  # type: ignore[attr-defined]
    with r:
        yield r


def test_https_with_custom_ca(tmp_path: Path, tls_receiver: Receiver) -> None:
    total = fill_sync(tmp_path, 4, 100)
    cfg = sync_cfg(tls_receiver.url, tls_receiver.secret, ca_file=str(tls_receiver.ca))
    assert cfg.url.startswith("https://localhost:")
    with WorkerThread(tmp_path, cfg):
        wait_until(lambda: unsynced(tmp_path) == (0, 0), 30, "upload over HTTPS")
    c = tls_receiver.counts()
    assert c["readings"] == c["distinct"] == total


def test_https_wrong_ca_fails_clearly(tmp_path: Path, tls_receiver: Receiver, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    fill_sync(tmp_path, 2, 100)
    other_ca = TestCA(tmp_path, "some-other-ca").path
    cfg = sync_cfg(tls_receiver.url, tls_receiver.secret, ca_file=str(other_ca))
    with WorkerThread(tmp_path, cfg) as w:
        err = _refused_and_kept(w, tls_receiver, tmp_path, 2)
    assert "TLS certificate of localhost" in err
    assert "could not be verified" in err and str(other_ca) in err
    assert w.worker.status.online is False
    _no_secret_anywhere(caplog, tmp_path, tls_receiver.secret)


def test_https_system_store_does_not_trust_private_ca(tmp_path: Path, tls_receiver) -> None:
    fill_sync(tmp_path, 1, 10)
    cfg = sync_cfg(tls_receiver.url, tls_receiver.secret)
    with WorkerThread(tmp_path, cfg) as w:
        err = _refused_and_kept(w, tls_receiver, tmp_path, 1)
    assert "could not be verified against the system CA store" in err
