"""Counters and gauges for the edge process, rendered in the Prometheus text format.

Deliberately tiny (no client library): a metric is a name, a help text and a dict from a
label tuple to a number.  Every dropped reading is counted with its reason, e.g.
``edgepipe_readings_dropped_total{stage="validity",reason="filtered"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["Metrics", "METRICS"]


class _Metric:
    __slots__ = ("name", "help", "kind", "labels", "values")

    def __init__(self, name: str, help: str, kind: str, labels: tuple[str, ...]) -> None:
        self.name, self.help, self.kind, self.labels = name, help, kind, labels
        self.values: dict[tuple[str, ...], float] = {}


class Metrics:
    """A registry of named counters and gauges (thread-safe enough for CPython counters)."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[Metrics], None]] = []

    def _get(self, name: str, help: str, kind: str, labels: tuple[str, ...]) -> _Metric:
        m = self._metrics.get(name)
        if m is None:
            m = self._metrics[name] = _Metric(name, help, kind, labels)
        return m

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> _Counter:
        return _Counter(self._get(name, help, "counter", tuple(labels)))

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> _Gauge:
        return _Gauge(self._get(name, help, "gauge", tuple(labels)))

    def add_collector(self, fn: Callable[[Metrics], None]) -> None:
        """``fn(metrics)`` runs before each render, to refresh gauges computed on demand."""
        self._collectors.append(fn)

    def value(self, name: str, **labels: str) -> float:
        """A metric's value summed over the series whose labels match those given."""
        m = self._metrics.get(name)
        if m is None:
            return 0.0
        want = [(i, str(labels[lbl])) for i, lbl in enumerate(m.labels) if lbl in labels]
        return sum(v for key, v in m.values.items() if all(key[i] == x for i, x in want))

    def describe(self) -> list[tuple[str, str, tuple[str, ...], str]]:
        """(name, kind, labels, help) of every registered metric, in registration order."""
        return [(m.name, m.kind, m.labels, m.help) for m in self._metrics.values()]

    def snapshot(self) -> dict[str, dict[tuple[str, ...], float]]:
        return {name: dict(m.values) for name, m in self._metrics.items()}

    def render(self) -> str:
        for fn in self._collectors:
            try:
                fn(self)
            except Exception:  # a failing collector must not break /metrics
                pass
        out: list[str] = []
        for m in self._metrics.values():
            out.append(f"# HELP {m.name} {m.help}")
            out.append(f"# TYPE {m.name} {m.kind}")
            for key, v in sorted(m.values.items()):
                if m.labels:
                    lbl = ",".join(
                        f'{k}="{_escape(val)}"' for k, val in zip(m.labels, key, strict=True)
                    )
                    out.append(f"{m.name}{{{lbl}}} {_num(v)}")
                else:
                    out.append(f"{m.name} {_num(v)}")
        return "\n".join(out) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class _Counter:
    __slots__ = ("_m",)

    def __init__(self, m: _Metric) -> None:
        self._m = m

    def inc(self, amount: float = 1, *labels: str) -> None:
        vals = self._m.values
        vals[labels] = vals.get(labels, 0) + amount

    def add(self, key: tuple[str, ...], amount: float) -> None:
        """:meth:`inc` with the labels given as one tuple made beforehand: for a path that
        counts the same series once per batch."""
        vals = self._m.values
        vals[key] = vals.get(key, 0) + amount


class _Gauge(_Counter):
    __slots__ = ()

    def set(self, value: float, *labels: str) -> None:
        self._m.values[labels] = value


#: The process-wide registry the edge components count into.
METRICS = Metrics()
