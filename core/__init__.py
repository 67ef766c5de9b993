"""edgepipe's bottom layer: what every other package may use, and nothing above it.

The data model (:class:`Batch`, :class:`Reading`, :class:`SeriesRegistry`), the error
hierarchy (``core._errors``), the metrics registry (:data:`METRICS`), the clock, backoff
and crash-safe file helpers.  This package imports the standard library only: the
layering check (``tests/test_layers.py``) refuses an import of any edgepipe package here.
"""
