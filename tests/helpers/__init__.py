"""Helpers shared by the test modules; fixtures live in ``tests/conftest.py``.

- :mod:`tests.helpers.edge` -- ``pipeline.yaml`` for a test, the ``edgepipe run`` child
  process and its ``/readyz`` and ``/metrics``, publishing, ``wait_for``.
- :mod:`tests.helpers.mqtt` -- a QoS 1 publisher thread, numbered messages, starting an
  edge process and waiting until it has subscribed.
- :mod:`tests.helpers.store` -- what an edge store holds, read back.
- :mod:`tests.helpers.crash` -- a store writer process to kill -9.
- :mod:`tests.helpers.powercut` -- the power-cut model (file operation recorder and replay).
- :mod:`tests.helpers.sync_env` -- receiver process, filled stores, sync configs and counts.
- :mod:`tests.helpers.proxy` -- a TCP proxy that can stall, cut and slow a link.
- :mod:`tests.helpers.pki` -- a throw-away certificate authority.
- :mod:`tests.helpers.cloud_client` -- signed uploads and a live receiver app for the cloud
  tests.
- :mod:`tests.helpers.wasm` -- filter stages and data for the chain tests.
- :mod:`tests.helpers.strategies` -- hypothesis strategies.
"""
