"""The receiver's backend contract without HTTP, on both backends: a sequence conflict
raises and stores nothing, schema set-up is idempotent, a SQLite database reopens with its
data, and the database URL forms."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest

from cloud import Backend, ReadingsQuery, SequenceConflict, open_backend
from cloud._app import rejection_for
from cloud._wire import decode_upload
from tests.helpers.cloud_client import make_batch, new_device, new_master_key, series_readings


# -- the backend contract without HTTP ------------------------------------------------------
def test_backend_conflict_raises_and_stores_nothing(backend: Backend) -> None:
    name, _ = new_device(backend)

    def upload(*batches: bytes):
        return decode_upload(
            msgpack.packb({"v": 1, "device": name, "batches": list(batches)}), name
        )

    now = int(time.time() * 1000)
    kw = {"link": "ethernet", "nbytes": 10, "nonce_expires": now + 600_000, "now": now}
    r = backend.ingest(upload(make_batch(1, series_readings(2))), nonce="1" * 32, **kw)
    assert (r.acked, r.duplicates, r.readings) == ([1], [], 2)
    with pytest.raises(SequenceConflict) as exc:
        backend.ingest(
            upload(make_batch(2, series_readings(1)), make_batch(1, series_readings(3))),
            nonce="2" * 32,
            **kw,
        )
    assert exc.value.seq == 1 and exc.value.device == name
    assert rejection_for(exc.value, upload=True).status == 409  # type: ignore[union-attr]
    assert backend.count_readings(name) == 2
    assert not backend.nonce_seen(name, "2" * 32, now)  # the refused request left no nonce
    assert backend.nonce_seen(name, "1" * 32, now)
    assert not backend.nonce_seen(name, "1" * 32, now + 700_000)  # expired
    q = backend.readings(ReadingsQuery(name, since=0, until=2**62))
    assert [row["value"] for row in q["rows"]] == [0.0, 1.0]
    assert backend.remove_device(name) and backend.get_device(name) is None
    assert backend.count_readings(name) == 0
    assert not backend.remove_device(name)


def test_schema_init_is_idempotent(backend: Backend) -> None:
    name, secret = new_device(backend)
    backend.init()
    backend.init()
    assert backend.get_device_secret(name) == secret  # nothing stored was dropped


def test_sqlite_reopen_keeps_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    key = new_master_key()
    with open_backend(url, master_key=key) as b:
        name, secret = new_device(b)
    with open_backend(url, master_key=key) as b:
        assert b.get_device_secret(name) == secret


def test_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud import CloudError

    monkeypatch.chdir(tmp_path)
    with open_backend("sqlite:///rel.db"):
        pass
    with open_backend(f"sqlite:///{tmp_path}/abs.db"):  # four slashes: absolute
        pass
    with open_backend(str(tmp_path / "bare.db")):
        pass
    assert {p.name for p in tmp_path.glob("*.db")} == {"rel.db", "abs.db", "bare.db"}
    with pytest.raises(CloudError, match="mysql"):
        open_backend("mysql://x/y")
