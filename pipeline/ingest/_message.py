"""One MQTT message as the ingest path sees it (no paho needed to use one)."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Message"]


class Message(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    mid: int
    dup: bool  # the DUP flag as the broker sent it
    arrival_ms: int
    generation: int
    #: DUP set, or received in the redelivery window after a (re)connect: the runtime
    #: checks the store before decoding it (see docs/ingest.md, "Redeliveries")
    maybe_seen: bool = False
