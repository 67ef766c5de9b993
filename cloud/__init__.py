"""edgepipe cloud receiver: accepts signed batch uploads from edge devices (sync wire
protocol v1) and serves their data and sync status to operators.

    app = cloud.create_app(cloud.Settings(db="sqlite:///cloud.db", api_token="..."))

Storage sits behind :class:`Backend` (SQLite by default, PostgreSQL for larger fleets), the
roles :class:`Devices`, :class:`Ingest`, :class:`Queries`, :class:`Operators`, device
health and alert state together.  Alerts (docs/alerts.md) are evaluated by the app when
``Settings.alerts_file`` names a rules file.  It raises domain errors (:class:`UnknownDevice`, :class:`SequenceConflict`, ...);
the app answers each with its HTTP status.  Device secrets are stored sealed with the
receiver's :class:`MasterKey`.
"""

from ._app import api_routes, create_app
from ._auth import require_operator
from ._backend import (
    Backend,
    Devices,
    Ingest,
    IngestResult,
    Operators,
    Queries,
    ReadingsQuery,
)
from ._errors import (
    CloudError,
    DeviceExists,
    MasterKeyError,
    NoDatabase,
    NonceReplayed,
    OperatorExists,
    Rejected,
    SecretUnreadable,
    SequenceConflict,
    UnknownDevice,
    UnknownOperator,
    UploadRefused,
)
from ._open import open_backend
from ._secrets import MasterKey
from ._settings import DashboardSettings, Settings

__all__ = [
    "Backend",
    "CloudError",
    "DashboardSettings",
    "DeviceExists",
    "Devices",
    "Ingest",
    "IngestResult",
    "MasterKey",
    "MasterKeyError",
    "NoDatabase",
    "NonceReplayed",
    "OperatorExists",
    "Operators",
    "Queries",
    "ReadingsQuery",
    "Rejected",
    "SecretUnreadable",
    "SequenceConflict",
    "Settings",
    "UnknownDevice",
    "UnknownOperator",
    "UploadRefused",
    "api_routes",
    "create_app",
    "open_backend",
    "require_operator",
]
