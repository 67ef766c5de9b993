"""The demo's simulated sensors: devices replaying the UCI air-quality data set over MQTT,
one JSON message per sample (13 metrics each), paced at a rate per device."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from devtools import _dataset as dataset

__all__ = ["Sensors", "load_rows"]


def load_rows(path: Path) -> list[dict[str, float]]:
    return [
        dict(zip(dataset.METRICS, values, strict=True)) for _, values in dataset.read_rows(path)
    ]


# -- the pieces -------------------------------------------------------------------------------
class Sensors(threading.Thread):
    """Sensor boxes replaying the data set: one JSON message per sample, 13 metrics each, on
    ``air/<device>``."""

    def __init__(
        self, host: str, port: int, rows: list[dict[str, float]], devices: list[str], rate: float
    ) -> None:
        super().__init__(name="sensors", daemon=True)
        self.host, self.port, self.rows = host, port, rows
        self.devices = devices
        self.rate = rate
        self.sent = dict.fromkeys(devices, 0)
        self.stop_evt = threading.Event()

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def run(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"demo-sensors-{os.getpid()}",
        )
        c.max_inflight_messages_set(200)
        while not self.stop_evt.is_set():
            try:
                c.connect(self.host, self.port)
                break
            except OSError:
                self.stop_evt.wait(0.2)
        c.loop_start()
        i, t0 = 0, time.monotonic()
        period = 1.0 / self.rate
        try:
            while not self.stop_evt.is_set():
                for k, dev in enumerate(self.devices):
                    row = self.rows[(i + k * 997) % len(self.rows)]
                    body = {"ts": round(time.time(), 3), **row}
                    c.publish(f"air/{dev}", json.dumps(body), qos=1)
                    self.sent[dev] += 1
                i += 1
                delay = t0 + i * period - time.monotonic()
                if delay > 0:
                    self.stop_evt.wait(delay)
        finally:
            c.loop_stop()
            c.disconnect()
