"""The seams of a running pipeline: what the runtime needs of the filter chain
(:class:`FilterChain`) and of the store (:class:`BatchSink`), the chain used when none is
configured, and :class:`Parts`, the collaborators the composition root hands the runtime."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from core._model import Batch, DeadLetter

if TYPE_CHECKING:
    from sync import SyncWorker

    from .chain import ChainWatcher
    from .ingest import Decoder, MQTTClient

__all__ = ["BatchSink", "ChainOutput", "FilterChain", "NoChain", "Output", "Parts"]


class ChainOutput(Protocol):
    batch: Batch
    dead_letters: Sequence[DeadLetter]


class FilterChain(Protocol):
    """The seam between the runtime and the filters (``pipeline.chain.Chain`` is one)."""

    @property
    def stopped(self) -> str | None: ...

    def process(self, batch: Batch) -> ChainOutput: ...

    def flush(self) -> ChainOutput: ...

    def snapshot(self) -> dict[str, bytes]: ...

    def restore(self, states: dict[str, bytes]) -> None: ...

    def describe(self) -> list[dict[str, Any]]: ...

    def hand_over(self, new: Any) -> ChainOutput: ...

    def close(self) -> None: ...


class BatchSink(Protocol):
    """Where a processed batch is committed in one transaction (``storage.Store`` is one)."""

    async def seen(self, keys: list[bytes]) -> set[bytes]: ...

    def seen_in_memory(self, keys: list[bytes]) -> set[bytes] | None: ...

    async def commit(
        self,
        batch: Batch,
        dead_letters: list[DeadLetter],
        keys: Iterable[bytes],
        states: dict[str, bytes],
    ) -> Any: ...

    async def load_states(self) -> dict[str, bytes]: ...

    async def stats(self) -> dict[str, Any]: ...

    async def reencrypt_in_background(self) -> None: ...

    async def close(self) -> None: ...


class NoChain:
    """The chain when none is configured: readings pass through unchanged."""

    stopped = None

    def process(self, batch: Batch) -> Output:
        return Output(batch, [])

    def flush(self) -> Output:
        return Output(Batch(), [])

    def snapshot(self) -> dict[str, bytes]:
        return {}

    def restore(self, states: dict[str, bytes]) -> None:
        pass

    def describe(self) -> list[dict[str, Any]]:
        return []

    def hand_over(self, new: Any) -> Output:
        return Output(Batch(), [])  # nothing in flight; the runtime restores new's state

    def close(self) -> None:
        pass


class Output:
    """A chain's output: the batch and its dead letters."""

    __slots__ = ("batch", "dead_letters")

    def __init__(self, batch: Batch, dead_letters: list[DeadLetter]) -> None:
        self.batch, self.dead_letters = batch, dead_letters


@dataclass
class Parts:
    """The collaborators of a running pipeline, built by ``pipeline._compose``."""

    store: BatchSink
    decoder: Decoder
    mqtt: MQTTClient
    chain: FilterChain | None  # None while a chain file is broken
    watcher: ChainWatcher | None
    sync: SyncWorker | None
