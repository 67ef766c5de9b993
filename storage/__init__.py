"""edgepipe's encrypted local store (SQLite in WAL mode, AES-256-GCM per row)."""

from protocol._keys import Keyring, Sealer, generate_key_line

from ._store import SCHEMA_VERSION, Store, StoredBatch, open_store

__all__ = [
    "SCHEMA_VERSION",
    "Keyring",
    "Sealer",
    "Store",
    "StoredBatch",
    "generate_key_line",
    "open_store",
]
