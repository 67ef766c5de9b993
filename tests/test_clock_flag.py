"""Clock sanity (docs/health.md): the readings of an upload whose signed timestamp is far from
the receiver's clock are stored flagged CLOCK_SKEW, visible in the read API and counted in
``GET /v1/receiver``; the ``clock_skew`` alert rule fires for that device.  Both backends,
a real uvicorn server."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml

from cloud import Backend, Settings, create_app
from core._clock import ManualClock
from core._model import Flags
from sync._health import encode_health
from tests.helpers.cloud_cli import cli, key_file
from tests.helpers.cloud_client import (
    TOKEN,
    DeviceClient,
    LiveServer,
    encode,
    make_batch,
    new_device,
    series_readings,
)
from tests.helpers.edge import wait_for


def test_readings_of_a_skewed_upload_are_flagged(backend: Backend, tmp_path: Path) -> None:
    name, secret = new_device(backend, "skew")
    rules = tmp_path / "alerts.yaml"
    rules.write_text(
        yaml.safe_dump(
            {
                "evaluate_every_s": 3600,
                "rules": [
                    {"name": "skew", "kind": "clock_skew", "above_s": 300, "devices": [name]}
                ],
            }
        )
    )
    # The operator accepts devices up to an hour off, and flags those more than 5 min off.
    settings = Settings(api_token=TOKEN, max_skew_s=3600, clock_flag_s=300, alerts_file=str(rules))
    app = create_app(settings, backend=backend, clock=ManualClock(time.time()))
    with (
        LiveServer(app) as server,
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as op,
    ):
        dev = DeviceClient(server.url, name, secret)
        now = int(time.time() * 1000)
        on_time = make_batch(1, series_readings(3, start=now - 60_000, metric="t"))
        assert dev.upload([on_time], timestamp=int(time.time()) - 20).status_code == 200
        # 15 minutes slow: its readings (stamped by the same clock) are 15 min early
        health = encode_health([(1, {"ts": now - 900_000, "rss_kb": 1})])
        late = make_batch(2, series_readings(4, start=now - 960_000, metric="t"))
        body = encode(dev.body([late], health=health), dev.encoding)
        r = dev.post_raw(body, timestamp=int(time.time()) - 900)
        assert r.status_code == 200, r.text

        rows = op.get("/v1/readings", params={"device": name, "since": 0}).json()["rows"]
        flagged = [x for x in rows if x["flags"] & Flags.CLOCK_SKEW]
        assert len(rows) == 7 and len(flagged) == 4
        assert {x["ts"] for x in flagged} == {now - 960_000 + i * 1000 for i in range(4)}

        clock = op.get("/v1/receiver").json()["clock"]
        assert clock["threshold_s"] == 300
        mine = clock["devices"][name]
        assert mine["uploads"] == 1 and mine["readings"] == 4
        assert 899_000 <= mine["last_skew_ms"] <= 905_000
        assert clock["flagged_uploads"] >= 1 and clock["flagged_readings"] >= 4

        def firing() -> list[dict]:
            params = {"state": "firing", "device": name}
            return op.get("/v1/alerts", params=params).json()["alerts"]

        (alert,) = wait_for(firing)  # evaluated when the upload arrived
        assert alert["rule"] == "skew" and 899 <= alert["value"] <= 905
        assert "clock off by +9" in alert["summary"]  # receiver minus device: +900 s
        dev.close()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        # was: OverflowError and a traceback at startup (exit 1)
        ({"EDGEPIPE_CLOUD_CLOCK_FLAG_S": "inf"}, "clock_flag_s"),
        # was: accepted, and no upload was ever flagged (beyond max_skew_s it is refused)
        (
            {"EDGEPIPE_CLOUD_CLOCK_FLAG_S": "600", "EDGEPIPE_CLOUD_MAX_SKEW_S": "300"},
            "clock_flag_s (600) must be less than max_skew_s (300)",
        ),
    ],
)
def test_a_clock_flag_that_can_never_flag_is_a_usage_error(
    tmp_path: Path, env: dict[str, str], says: str
) -> None:
    env = {"EDGEPIPE_CLOUD_MASTER_KEY_FILE": str(key_file(tmp_path)), **env}
    r = cli("serve", "--db", f"sqlite:///{tmp_path / 'c.db'}", "--port", "0", env=env)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr
