"""The UCI air-quality data set (De Vito et al., 2008; CC BY 4.0, attribution in
``data/README.md``): one reader for the demo, the benchmarks and the tests.

The full set (9,357 hourly rows x 13 metrics, ``-200`` = missing) is carried in the
repository's ``data/``; an installed package without the checkout has the first 30 days
(``devtools/data/airquality-sample.csv``) for the demo.
"""

from __future__ import annotations

import calendar
import csv
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FULL", "METRICS", "SAMPLE", "find_dataset", "read_rows"]

_PKG = Path(__file__).resolve().parent
FULL = _PKG.parent / "data" / "airquality-uci.csv"
SAMPLE = _PKG / "data" / "airquality-sample.csv"
METRICS = (
    "CO_GT",
    "PT08_S1_CO",
    "NMHC_GT",
    "C6H6_GT",
    "PT08_S2_NMHC",
    "NOx_GT",
    "PT08_S3_NOx",
    "NO2_GT",
    "PT08_S4_NO2",
    "PT08_S5_O3",
    "T",
    "RH",
    "AH",
)


def find_dataset() -> Path:
    """The full data set where the checkout has it, else the packaged sample."""
    return FULL if FULL.exists() else SAMPLE


def read_rows(path: Path = FULL) -> Iterator[tuple[int, list[float]]]:
    """``(ts_ms, [13 values in METRICS order])`` per row, in file order; timestamps as UTC.
    Rows with a missing or malformed field are skipped."""
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows)
        if tuple(header[2:]) != METRICS:
            raise ValueError(f"{path}: unexpected columns {header[2:]}")
        for row in rows:
            if len(row) != 2 + len(METRICS) or not row[0]:
                continue
            try:
                d, mo, y = (int(x) for x in row[0].split("/"))
                hh, mm, ss = (int(x) for x in row[1].split(":"))
                values = [float(v) for v in row[2:]]
            except ValueError:
                continue
            yield calendar.timegm((y, mo, d, hh, mm, ss)) * 1000, values
