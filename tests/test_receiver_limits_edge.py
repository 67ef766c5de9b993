"""What the edge does when the receiver refuses an upload for one of its limits: the
batches stay in the store, unsynced, and the refusal with its reason is reported (the sync
status, the error counter) -- never dropped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core._errors import SyncError
from core._metrics import METRICS
from tests.helpers.sync_env import Receiver, fill, make_worker, open_store, sync_cfg, unsynced


def test_a_refused_upload_stays_on_the_device_and_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEPIPE_CLOUD_MAX_SERIES_PER_DEVICE", "2")
    rx = Receiver(tmp_path)
    secret = rx.add_device("edge-1")
    with rx:

        async def go() -> SyncError:
            store = await open_store(tmp_path)
            try:
                await fill(store, 3, 20, series=4)  # four series: two more than allowed
                worker = make_worker(store, sync_cfg(rx.url, secret), "edge-1", link="wifi")
                try:
                    with pytest.raises(SyncError) as exc:
                        await worker.drain()
                    assert worker.status.last_error == str(exc.value)
                finally:
                    worker.close()
                return exc.value
            finally:
                await store.close()

        before = METRICS.value("edgepipe_sync_errors_total", kind="422")
        err = asyncio.run(go())
        assert err.status == 422
        assert "series_limit" in str(err) and "more than 2 series" in str(err)
        assert METRICS.value("edgepipe_sync_errors_total", kind="422") == before + 1
        assert unsynced(tmp_path) == (3, 60)  # every batch kept for a later try
        assert rx.counts()["readings"] == 0
        assert rx.rejection_reasons() == ["series_limit"]
        assert "Traceback" not in rx.log.read_text()
