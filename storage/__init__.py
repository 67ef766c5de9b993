"""edgepipe's encrypted local store (SQLite in WAL mode, AES-256-GCM per row)."""

from protocol._keys import Keyring, Sealer, generate_key_line

from ._queries import StoredBatch
from ._schema import SCHEMA_VERSION
from ._store import Store

__all__ = [
    "SCHEMA_VERSION",
    "Keyring",
    "Sealer",
    "Store",
    "StoredBatch",
    "generate_key_line",
]
