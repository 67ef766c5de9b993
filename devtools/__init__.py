"""Development and first-contact tools that are not part of the edge data path: a
private mosquitto launcher (tests, benchmarks, the demo) and the demo's fallback broker.

Nothing in ``pipeline``, ``storage`` or ``sync`` imports this package except the demo.
"""
