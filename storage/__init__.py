"""edgepipe's encrypted local store (SQLite in WAL mode, AES-256-GCM per row)."""

from ._crypto import Keyring, Sealer, generate_key_line
from ._store import Store, StoredBatch

__all__ = ["Keyring", "Sealer", "Store", "StoredBatch", "generate_key_line"]
