"""Storage behind one narrow interface per role, with the algorithms written once.

The web app talks to a :class:`Backend`, which is the roles together, each a small
Protocol in its own module:

* :class:`~cloud._devices.Devices` -- registered devices, their sealed secrets, the master
  key (add, list, get, secrets, re-wrap);
* :class:`~cloud._ingest.Ingest` -- uploads, idempotent on (device, seq), and their nonces;
* :class:`~cloud._queries.Queries` -- readings, rollups, the logs and the fleet's status;
* :class:`~cloud._operators.Operators` -- dashboard operators and their sessions;
* :class:`~cloud._health.Health` -- device health snapshots and warning logs;
* :class:`~cloud._alert_store.AlertState` -- each alert's state (firing, resolved, delivered).
* :class:`~cloud._bundles.Bundles` -- signed chain bundles, their modules, and the desired
  and reported bundle state of every device;
* :class:`~cloud._rollout_store.Rollouts` -- device labels and staged rollouts.

:class:`SQLBackend` implements every role once, in portable SQL, on top of the dialect
hooks of :class:`~cloud._sql.SQLBase` that the two concrete backends fill in
(:mod:`cloud._sqlite`, :mod:`cloud._postgres`).  Every method blocks; the app runs them in
worker threads.  The backend raises domain errors only (:mod:`cloud._errors`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ._alert_store import AlertState, AlertStateSQL
from ._bundles import Bundles, BundlesSQL
from ._devices import Devices, DevicesSQL
from ._health import Health, HealthSQL
from ._ingest import Ingest, IngestResult, IngestSQL
from ._operators import Operators, OperatorsSQL
from ._queries import Queries, QueriesSQL, ReadingsQuery
from ._rollout_store import Rollouts, RolloutsSQL
from ._schema import SCHEMA_VERSION, SchemaSQL
from ._sql import ROLLUP_MS

__all__ = [
    "ROLLUP_MS",
    "Bundles",
    "SCHEMA_VERSION",
    "Backend",
    "Devices",
    "Ingest",
    "IngestResult",
    "Operators",
    "Queries",
    "ReadingsQuery",
    "SQLBackend",
]


@runtime_checkable
class Backend(Devices, Ingest, Queries, Operators, Health, AlertState, Bundles, Rollouts, Protocol):
    """What the receiver needs from storage: every role, plus its lifetime.  Device secrets
    are stored sealed with ``master_key``; without one the backend serves everything except
    device secrets."""

    def initialised(self) -> bool:
        """Whether the database holds an edgepipe-cloud schema (read only)."""

    def init(self) -> None:
        """Create or migrate the schema (idempotent).  With a master key: refuse a key that
        is not the one the database was sealed with (:class:`MasterKeyError`, nothing
        written), then seal any secret still stored in plaintext."""

    def close(self) -> None: ...


class SQLBackend(
    SchemaSQL,
    DevicesSQL,
    HealthSQL,
    IngestSQL,
    QueriesSQL,
    OperatorsSQL,
    AlertStateSQL,
    BundlesSQL,
    RolloutsSQL,
):
    """Every role, in SQL both dialects accept; subclasses supply the dialect hooks."""

    def __enter__(self) -> SQLBackend:
        return self

    def init(self) -> None:
        with self._write() as cur:
            self._migrate(cur)
            if self.master_key is not None:
                self._adopt_master_key(cur, self.master_key)
