"""Ingest: MQTT messages in (paho wrapped once for asyncio), payload codecs, messages to a
columnar :class:`core._model.Batch` with dead letters and message identities.

Names load on first use (the codecs alone do not need paho)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Decoded", "Decoder", "MQTTClient", "Message"]

_WHERE = {
    "Decoded": "._decoder",
    "Decoder": "._decoder",
    "MQTTClient": "._mqtt",
    "Message": "._mqtt",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(mod, __name__), name)
