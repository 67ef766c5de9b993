"""End to end on real components: mosquitto -> edgepipe -> encrypted SQLite (-> receiver)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.edge import make_config, publish, reading_msg, wait_for
from tests.helpers.store import stored


def test_readings_flow_to_encrypted_store(tmp_path, broker, keyfile, edge):
    cfg = make_config(tmp_path, broker, keyfile)
    proc = edge(cfg)
    n = 500
    # the subscription must exist before publishing: wait for the status topic / log
    proc.wait_subscribed()
    publish(broker, [reading_msg(f"dev{i % 5}", "temp", i, i * 0.5) for i in range(n)])
    db = tmp_path / "store.db"
    wait_for(lambda: db.exists() and len(stored(db, keyfile)) >= n, 30, "all readings stored")
    assert proc.terminate() == 0
    rows = stored(db, keyfile)
    assert len(rows) == n
    assert sorted(v for *_, v in rows) == [i * 0.5 for i in range(n)]
    assert {d for d, *_ in rows} == {f"dev{i}" for i in range(5)}
    # nothing readable on disk
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    assert b"dev1" not in raw and b"temp" not in raw


def _receiver(tmp_path):
    """A real receiver (edgepipe-cloud serve) on loopback with one registered device."""
    from cloud._local import LocalReceiver

    rx = LocalReceiver(f"sqlite:///{tmp_path / 'cloud.db'}", log=tmp_path / "receiver.log")
    secret = rx.add_device("test-device")
    return rx.start(), secret, tmp_path / "cloud.db"


def _cloud_dead_letters(db: Path) -> list[tuple[str, str]]:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        return list(con.execute("SELECT topic, reason FROM dead_letters ORDER BY seq"))
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def _cloud_values(db: Path) -> list[float]:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        return sorted(v for (v,) in con.execute("SELECT val FROM readings"))
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def test_end_to_end_through_filter_and_receiver(tmp_path, broker, keyfile, edge):
    """N readings through mosquitto, a Wasm stage, the encrypted store and a sync to a
    real receiver: every valid one arrives in both places, the -200 sentinels in neither."""
    from tests.helpers.edge import REPO

    rx, secret, cloud_db = _receiver(tmp_path)
    url = rx.url
    try:
        cfg = make_config(
            tmp_path,
            broker,
            keyfile,
            chain=[
                {
                    "name": "validity",
                    "module": str(REPO / "filters/lib/validity.wasm"),
                    "kind": "filter",
                    "config": {"sentinel": -200},
                }
            ],
            sync={"enabled": True, "url": url, "device_secret": secret, "interval_s": 0.2},
        )
        proc = edge(cfg)
        proc.wait_subscribed()
        n = 1000
        values = [-200.0 if i % 10 == 0 else float(i) for i in range(n)]
        poison = [(f"sensors/dev/bad{i}", b"{not json") for i in range(3)]
        publish(broker, [reading_msg("dev", "co", i, v) for i, v in enumerate(values)] + poison)
        expected = sorted(v for v in values if v != -200.0)
        wait_for(lambda: _cloud_values(cloud_db) == expected, 40, "all readings at receiver")
        # the dead letters' metadata reaches the cloud's dead-letter log (never the payload)
        wait_for(lambda: len(_cloud_dead_letters(cloud_db)) == 3, 20, "dead letters at receiver")
        assert {t for t, _ in _cloud_dead_letters(cloud_db)} == {t for t, _ in poison}
        assert all("invalid JSON" in r for _, r in _cloud_dead_letters(cloud_db))
        assert proc.terminate() == 0
        assert sorted(v for *_, v in stored(tmp_path / "store.db", keyfile)) == expected
    finally:
        rx.stop()
