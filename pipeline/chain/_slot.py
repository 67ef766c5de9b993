"""A stage in the chain and what the chain keeps about it: its circuit breaker (on an
injected clock), its ``match:`` selection (a table by series id, applied to a batch by
the check kernel, :meth:`._check.OutputCheck.split`), its last good state and failure counts."""

from __future__ import annotations

import fnmatch

from config._models import StageConfig
from core._clock import Clock
from core._model import SeriesRegistry

from ._stage import WasmStage

__all__ = ["Breaker", "Slot"]


class Breaker:
    __slots__ = ("threshold", "cooldown", "failures", "open_until", "trips", "_clock")

    def __init__(self, threshold: int, cooldown: float, clock: Clock) -> None:
        self.threshold, self.cooldown = threshold, cooldown
        self._clock = clock
        self.failures = 0
        self.open_until = 0.0
        self.trips = 0

    def status(self, now: float | None = None) -> str:
        if self.failures < self.threshold:
            return "closed"
        now = self._clock.monotonic() if now is None else now
        return "open" if now < self.open_until else "half_open"

    def allows(self) -> bool:
        return self.failures < self.threshold or self._clock.monotonic() >= self.open_until

    def success(self) -> None:
        self.failures = 0

    def failure(self) -> bool:
        """Count a failure; True when this trips (or re-trips) the breaker."""
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = self._clock.monotonic() + self.cooldown
            self.trips += 1
            return True
        return False


class Slot:
    """A stage in the chain plus everything the chain keeps about it."""

    def __init__(self, cfg: StageConfig, stage: WasmStage, clock: Clock) -> None:
        self.cfg = cfg
        self.name = cfg.name
        # the label tuples it is counted under once per batch
        self.key = (cfg.name,)
        self.key_in, self.key_out = (cfg.name, "in"), (cfg.name, "out")
        self.stage = stage
        lim = cfg.limits
        self.breaker = Breaker(lim.breaker_failures, lim.breaker_cooldown_s, clock)
        self.good_state: bytes | None = None  # last snapshot after a successful batch
        m = cfg.match
        self.devices = m.devices
        self.metrics = m.metrics
        self.match_all = m.devices is None and m.metrics is None
        self._table = b""  # see selection()
        self.last_error: str | None = None
        self.last_code: str | None = None  # the code of the last failure, while failing
        self.batches = self.failures = 0
        self.quarantined = self.state_dropped = self.recycles = 0
        self.attempts = cfg.limits.stop_attempts if cfg.on_error == "stop" else 1

    def selection(self, registry: SeriesRegistry) -> bytes:
        """The stage's ``match:`` as a table indexed by series id (1: the stage sees that
        series' records), covering every series ``registry`` knows: each series is
        matched against the patterns once, when it first appears."""
        table = self._table
        if len(table) < len(registry):
            grown = bytearray(table)
            for sid in range(len(table), len(registry)):
                key = registry.key(sid)
                grown.append(
                    (
                        self.devices is None
                        or any(fnmatch.fnmatchcase(key.device, p) for p in self.devices)
                    )
                    and (
                        self.metrics is None
                        or any(fnmatch.fnmatchcase(key.metric, p) for p in self.metrics)
                    )
                )
            table = self._table = bytes(grown)
        return table
