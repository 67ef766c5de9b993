"""Admission of uploads: what a request may hold, and when, before and after it is
authenticated.

A request holds nothing shared until it has proved who sent it:

* a v2-signed upload is authenticated from its headers alone (the body's digest is signed),
  then holds one of its device's ``max_inflight_per_device`` places while its body is read
  (within ``body_timeout_s``);
* a v1-signed upload (older devices) can only be checked once its body is in, so its body is
  read on one of ``max_unverified_bodies`` places, within the same deadline;
* only an authenticated upload takes one of the ``max_inflight_uploads`` processing slots
  (decoding and the database transaction).

Refusals of requests that did not prove their origin are counted here, in memory, by
reason (never written to the database per request), and sampled into the receiver log at a
bounded rate.  :meth:`UploadGate.snapshot` is what ``GET /v1/receiver`` shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DeviceRate", "LogSampler", "UploadGate"]

log = logging.getLogger("edgepipe.cloud")

#: Devices whose rate is tracked at once (the least recently seen are forgotten first).
MAX_TRACKED_DEVICES = 100_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class DeviceRate:
    """A token bucket per device: ``rate_per_s`` uploads a second, bursts of ``burst``."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_TRACKED_DEVICES,
    ) -> None:
        self.rate, self.burst, self.max_keys = rate_per_s, burst, max_keys
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, device: str) -> float | None:
        """None if ``device`` may upload now (one token spent), else seconds to wait."""
        now = self._clock()
        b = self._buckets.pop(device, None)
        if b is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.pop(next(iter(self._buckets)))
            b = _Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
        b.at = now
        self._buckets[device] = b  # most recently seen last
        if b.tokens >= 1:
            b.tokens -= 1
            return None
        return (1 - b.tokens) / self.rate


class LogSampler:
    """At most ``per_s`` log lines a second (one token bucket); what it drops is summed into
    the next line it lets through."""

    def __init__(self, per_s: float = 1.0, *, clock: Callable[[], float] = time.monotonic):
        self.per_s = per_s
        self._clock = clock
        self._tokens = float(per_s) if per_s >= 1 else 1.0
        self._at = clock()
        self._dropped = 0
        self._lock = threading.Lock()

    def __call__(self, msg: str, *args: object) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(max(self.per_s, 1.0), self._tokens + (now - self._at) * self.per_s)
            self._at = now
            if self._tokens < 1:
                self._dropped += 1
                return False
            self._tokens -= 1
            dropped, self._dropped = self._dropped, 0
        suffix = f" (and {dropped} more refusals not logged)" if dropped else ""
        log.warning(msg + "%s", *args, suffix)
        return True


class UploadGate:
    """The counters and places of the upload endpoint (used on the event loop only)."""

    def __init__(
        self,
        *,
        max_inflight: int,
        max_per_device: int,
        max_unverified: int,
        rate: DeviceRate,
        sampler: LogSampler | None = None,
    ) -> None:
        self.max_inflight, self.max_per_device = max_inflight, max_per_device
        self.max_unverified = max_unverified
        self.rate = rate
        self.sampler = sampler or LogSampler()
        self.inflight = 0  # processing slots taken (authenticated uploads only)
        self.unverified = 0  # v1 bodies being read before their signature can be checked
        self.reading = 0  # bodies being read (either kind)
        self.per_device: dict[str, int] = {}
        self.refused: Counter[str] = Counter()  # unauthenticated refusals, by reason
        self.accepted = 0

    # -- places -----------------------------------------------------------------------------
    def enter_device(self, device: str) -> bool:
        n = self.per_device.get(device, 0)
        if n >= self.max_per_device:
            return False
        self.per_device[device] = n + 1
        return True

    def leave_device(self, device: str) -> None:
        n = self.per_device.get(device, 0) - 1
        if n > 0:
            self.per_device[device] = n
        else:
            self.per_device.pop(device, None)

    def enter_unverified(self) -> bool:
        if self.unverified >= self.max_unverified:
            return False
        self.unverified += 1
        return True

    def leave_unverified(self) -> None:
        self.unverified -= 1

    def enter_processing(self) -> bool:
        if self.inflight >= self.max_inflight:
            return False
        self.inflight += 1
        return True

    def leave_processing(self) -> None:
        self.inflight -= 1

    # -- refusals ---------------------------------------------------------------------------
    def refused_unauthenticated(self, reason: str, remote: str | None, claimed: str | None) -> None:
        """Count a refusal that is not written per request (one of a request that did not
        prove its origin, or a rate/overload refusal); sample it into the log."""
        self.refused[reason] += 1
        self.sampler(
            "refused upload from %s: %s (device %r; counted, not logged per request)",
            remote,
            reason,
            (claimed or "")[:64],
        )

    def snapshot(self) -> dict[str, object]:
        return {
            "inflight": self.inflight,
            "max_inflight": self.max_inflight,
            "reading_bodies": self.reading,
            "unverified_bodies": self.unverified,
            "max_unverified_bodies": self.max_unverified,
            "devices_in_flight": len(self.per_device),
            "accepted": self.accepted,
            "refused_unauthenticated": dict(sorted(self.refused.items())),
            "refused_unauthenticated_total": sum(self.refused.values()),
        }
