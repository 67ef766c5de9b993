"""edgepipe cloud receiver: accepts signed batch uploads from edge devices (sync wire
protocol v1) and serves their data and sync status to operators.

    app = cloud.create_app(cloud.Settings(db="sqlite:///cloud.db", api_token="..."))

Storage sits behind :class:`Backend` (SQLite by default, PostgreSQL for larger fleets).
Device secrets are stored sealed with the receiver's :class:`MasterKey`.
"""

from ._app import api_routes, create_app, require_operator
from ._backend import Backend, IngestResult, ReadingsQuery, open_backend
from ._errors import (
    CloudError,
    DeviceExists,
    MasterKeyError,
    OperatorExists,
    Rejected,
    SecretUnreadable,
    SequenceConflict,
    UnknownDevice,
)
from ._secrets import MasterKey
from ._settings import Settings

__all__ = [
    "Backend",
    "CloudError",
    "DeviceExists",
    "IngestResult",
    "MasterKey",
    "MasterKeyError",
    "OperatorExists",
    "ReadingsQuery",
    "Rejected",
    "SecretUnreadable",
    "SequenceConflict",
    "Settings",
    "UnknownDevice",
    "api_routes",
    "create_app",
    "open_backend",
    "require_operator",
]
