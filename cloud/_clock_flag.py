"""Clock sanity on the receiver (docs/health.md): the readings of an upload whose signed
timestamp is further than ``clock_flag_s`` from the receiver's clock are stored with the
``CLOCK_SKEW`` flag bit (``core._model.Flags``), so a device whose clock is far off has its
readings marked as suspect rather than silently misplaced.  Counted per device and shown in
``GET /v1/receiver`` (``clock``)."""

from __future__ import annotations

import threading
from typing import Any

from core._model import Flags

from ._wire import Upload

__all__ = ["ClockFlags"]


class ClockFlags:
    """Flags the readings of skewed uploads and counts them."""

    def __init__(self, threshold_s: float) -> None:
        self.threshold_ms = int(threshold_s * 1000)
        self._lock = threading.Lock()
        self.uploads = 0
        self.readings = 0
        #: per device: flagged uploads, flagged readings, the last skew seen (ms)
        self.devices: dict[str, dict[str, int]] = {}

    def mark(self, upload: Upload) -> int:
        """Set ``CLOCK_SKEW`` on every reading of ``upload`` if its clock is too far off;
        returns how many readings were flagged."""
        skew = upload.clock_skew_ms
        if skew is None or abs(skew) <= self.threshold_ms:
            return 0
        n = 0
        for b in upload.batches:
            b.flags[:] = [f | Flags.CLOCK_SKEW for f in b.flags]
            n += len(b.flags)
        return n

    def stored(self, upload: Upload, flagged: int) -> None:
        """``upload`` was stored, ``flagged`` of its readings new and flagged: count them."""
        skew = upload.clock_skew_ms
        if skew is None or abs(skew) <= self.threshold_ms:
            return
        with self._lock:
            self.uploads += 1
            self.readings += flagged
            d = self.devices.setdefault(upload.device, {"uploads": 0, "readings": 0})
            d["uploads"] += 1
            d["readings"] += flagged
            d["last_skew_ms"] = -skew  # receiver minus device, as in the health records

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "threshold_s": self.threshold_ms / 1000,
                "flagged_uploads": self.uploads,
                "flagged_readings": self.readings,
                "devices": {k: dict(v) for k, v in sorted(self.devices.items())},
            }
