"""Ingest: MQTT messages in (paho wrapped once for asyncio), payload codecs, messages to a
columnar :class:`core._model.Batch` with dead letters and message identities.

Names load on first use (the codecs alone do not need paho)."""

from __future__ import annotations

from core._lazy import lazy_names

__all__ = ["BloomBits", "Decoded", "Decoder", "MQTTClient", "Message"]

_WHERE = {
    "BloomBits": "._kernel",
    "Decoded": "._decoder",
    "Decoder": "._decoder",
    "MQTTClient": "._mqtt",
    "Message": "._message",
}


__getattr__ = lazy_names(__name__, _WHERE)
