"""Ingest: MQTT messages in (paho wrapped once for asyncio), payload codecs, messages to a
columnar :class:`core._model.Batch` with dead letters and message identities."""
