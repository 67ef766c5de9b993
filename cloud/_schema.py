"""The receiver's tables, created or migrated once per start (idempotent)."""

from __future__ import annotations

from typing import Any

from ._errors import CloudError
from ._rollout_store import rollout_ddl
from ._sql import ROLLUP_MS, SQLBase

__all__ = ["SCHEMA_VERSION", "SchemaSQL"]

#: 1: device secrets in plaintext hex.  2: sealed with the master key (``secret_key_id``).
#: 3: device health snapshots and warning logs (``device_health``, ``device_logs``).
#: 4: alert state (``alerts``).
#: 5: signed chain bundles, their modules, desired and reported state per device
#: (``bundles``, ``bundle_files``, ``bundle_modules``, ``device_bundle``, ``bundle_events``).
#: 6: device labels and rollouts (``device_labels``, ``rollouts``, ``rollout_devices``,
#: ``rollout_events``; :mod:`cloud._rollout_store`).
SCHEMA_VERSION = 6


class SchemaSQL(SQLBase):
    def _ddl(self) -> list[str]:
        pk, dbl, blob = self.AUTO_PK, self.DOUBLE, self.BYTES
        return [
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
            f"""CREATE TABLE IF NOT EXISTS devices (
                id {pk},
                name TEXT NOT NULL UNIQUE,
                secret TEXT NOT NULL,
                secret_key_id TEXT,
                created_ms BIGINT NOT NULL,
                last_seen_ms BIGINT,
                last_sync_ms BIGINT,
                last_link TEXT,
                last_seq BIGINT,
                status TEXT,
                last_error TEXT,
                last_error_ms BIGINT)""",
            """CREATE TABLE IF NOT EXISTS device_daily (
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                day TEXT NOT NULL,
                readings BIGINT NOT NULL,
                bytes BIGINT NOT NULL,
                uploads BIGINT NOT NULL,
                PRIMARY KEY (device_id, day))""",
            """CREATE TABLE IF NOT EXISTS batches (
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                seq BIGINT NOT NULL,
                sha256 TEXT NOT NULL,
                readings INTEGER NOT NULL,
                received_ms BIGINT NOT NULL,
                PRIMARY KEY (device_id, seq))""",
            f"""CREATE TABLE IF NOT EXISTS series (
                id {pk},
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                source TEXT NOT NULL,
                metric TEXT NOT NULL,
                tags TEXT NOT NULL,
                UNIQUE (device_id, source, metric, tags))""",
            f"""CREATE TABLE IF NOT EXISTS readings (
                series_id BIGINT NOT NULL REFERENCES series(id) ON DELETE CASCADE,
                ts BIGINT NOT NULL,
                val {dbl} NOT NULL,
                flags BIGINT NOT NULL,
                seq BIGINT NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS readings_series_ts ON readings (series_id, ts)",
            """CREATE TABLE IF NOT EXISTS nonces (
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                nonce TEXT NOT NULL,
                expires_ms BIGINT NOT NULL,
                PRIMARY KEY (device_id, nonce))""",
            "CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_ms)",
            f"""CREATE TABLE IF NOT EXISTS rejections (
                id {pk},
                device TEXT,
                ts_ms BIGINT NOT NULL,
                reason TEXT NOT NULL,
                detail TEXT NOT NULL,
                remote TEXT)""",
            "CREATE INDEX IF NOT EXISTS rejections_device ON rejections (device, id)",
            """CREATE TABLE IF NOT EXISTS dead_letters (
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                seq BIGINT NOT NULL,
                ts BIGINT NOT NULL,
                topic TEXT NOT NULL,
                stage TEXT,
                reason TEXT NOT NULL,
                size BIGINT NOT NULL,
                received_ms BIGINT NOT NULL,
                PRIMARY KEY (device_id, seq))""",
            f"""CREATE TABLE IF NOT EXISTS readings_hourly (
                series_id BIGINT NOT NULL REFERENCES series(id) ON DELETE CASCADE,
                hour BIGINT NOT NULL,
                n BIGINT NOT NULL,
                total {dbl} NOT NULL,
                lo {dbl} NOT NULL,
                hi {dbl} NOT NULL,
                PRIMARY KEY (series_id, hour))""",
            "CREATE INDEX IF NOT EXISTS rejections_ts ON rejections (ts_ms)",
            f"""CREATE TABLE IF NOT EXISTS operators (
                id {pk},
                name TEXT NOT NULL UNIQUE,
                pwhash TEXT NOT NULL,
                created_ms BIGINT NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS sessions (
                key TEXT PRIMARY KEY,
                operator_id BIGINT NOT NULL REFERENCES operators(id) ON DELETE CASCADE,
                csrf TEXT NOT NULL,
                created_ms BIGINT NOT NULL,
                expires_ms BIGINT NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_ms)",
            """CREATE TABLE IF NOT EXISTS master_keys (
                key_id TEXT PRIMARY KEY,
                key_check TEXT NOT NULL,
                created_ms BIGINT NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS device_health (
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                seq BIGINT NOT NULL,
                ts BIGINT NOT NULL,
                data TEXT NOT NULL,
                received_ms BIGINT NOT NULL,
                PRIMARY KEY (device_id, seq))""",
            "CREATE INDEX IF NOT EXISTS device_health_ts ON device_health (device_id, ts)",
            """CREATE TABLE IF NOT EXISTS device_logs (
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                seq BIGINT NOT NULL,
                ts BIGINT NOT NULL,
                last_ts BIGINT NOT NULL,
                level TEXT NOT NULL,
                logger TEXT NOT NULL,
                msg TEXT NOT NULL,
                n BIGINT NOT NULL,
                received_ms BIGINT NOT NULL,
                PRIMARY KEY (device_id, seq))""",
            "CREATE INDEX IF NOT EXISTS device_logs_ts ON device_logs (device_id, ts)",
            # the fleet-wide log view: newest first across devices
            "CREATE INDEX IF NOT EXISTS device_logs_fleet ON device_logs (ts, device_id, seq)",
            f"""CREATE TABLE IF NOT EXISTS alerts (
                key TEXT PRIMARY KEY,
                rule TEXT NOT NULL,
                kind TEXT NOT NULL,
                device TEXT NOT NULL,
                severity TEXT NOT NULL,
                state TEXT NOT NULL,
                summary TEXT NOT NULL,
                labels TEXT NOT NULL,
                value {dbl},
                started_ms BIGINT NOT NULL,
                updated_ms BIGINT NOT NULL,
                resolved_ms BIGINT,
                notified TEXT)""",
            "CREATE INDEX IF NOT EXISTS alerts_updated ON alerts (updated_ms)",
            f"""CREATE TABLE IF NOT EXISTS bundle_modules (
                sha256 TEXT PRIMARY KEY,
                size BIGINT NOT NULL,
                data {blob} NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS bundles (
                version BIGINT PRIMARY KEY,
                fleet TEXT NOT NULL,
                priority TEXT NOT NULL,
                key_id TEXT NOT NULL,
                not_before BIGINT NOT NULL,
                not_after BIGINT NOT NULL,
                created_ms BIGINT NOT NULL,
                filters_sha256 TEXT NOT NULL,
                total_bytes BIGINT NOT NULL,
                manifest TEXT NOT NULL,
                signature TEXT NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS bundle_files (
                version BIGINT NOT NULL REFERENCES bundles(version) ON DELETE CASCADE,
                path TEXT NOT NULL,
                sha256 TEXT NOT NULL REFERENCES bundle_modules(sha256),
                PRIMARY KEY (version, path))""",
            "CREATE INDEX IF NOT EXISTS bundle_files_sha ON bundle_files (sha256, version)",
            """CREATE TABLE IF NOT EXISTS device_bundle (
                device_id BIGINT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
                desired_version BIGINT REFERENCES bundles(version),
                desired_reason TEXT,
                desired_ms BIGINT,
                active_version BIGINT,
                previous_version BIGINT,
                applied_ms BIGINT,
                status TEXT,
                status_version BIGINT,
                status_reason TEXT,
                status_detail TEXT,
                reported_ms BIGINT,
                health TEXT)""",
            f"""CREATE TABLE IF NOT EXISTS bundle_events (
                id {pk},
                device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                ts_ms BIGINT NOT NULL,
                kind TEXT NOT NULL,
                version BIGINT,
                reason TEXT,
                detail TEXT)""",
            "CREATE INDEX IF NOT EXISTS bundle_events_device ON bundle_events (device_id, id)",
            *rollout_ddl(pk),
        ]

    def initialised(self) -> bool:
        """Whether this database holds an edgepipe-cloud schema (read only)."""
        with self._read() as cur:
            cur.execute(self._q(self.TABLE_EXISTS), ("schema_version",))
            return cur.fetchone() is not None

    def _migrate(self, cur: Any) -> None:
        """Create or migrate the schema inside the caller's write transaction."""
        for stmt in self._ddl():
            cur.execute(stmt)
        cur.execute("SELECT version FROM schema_version")
        row = cur.fetchone()
        if row is None:
            cur.execute(
                self._q("INSERT INTO schema_version (version) VALUES (?)"), (SCHEMA_VERSION,)
            )
        elif row[0] > SCHEMA_VERSION:
            raise CloudError(
                f"database schema version {row[0]} is newer than this edgepipe-cloud "
                f"({SCHEMA_VERSION}); upgrade edgepipe-cloud"
            )
        elif row[0] < SCHEMA_VERSION:
            if row[0] < 2:
                # Version 1 kept device secrets in plaintext; NULL key id marks such a row.
                cur.execute("ALTER TABLE devices ADD COLUMN secret_key_id TEXT")
            # Versions 3 to 6 only add tables (device records, alerts, bundles, rollouts),
            # created above.
            cur.execute(self._q("UPDATE schema_version SET version = ?"), (SCHEMA_VERSION,))
        # Databases created before the hourly rollup existed: build it once.
        cur.execute("SELECT 1 FROM readings_hourly LIMIT 1")
        if cur.fetchone() is None:
            h = ROLLUP_MS
            cur.execute(
                "INSERT INTO readings_hourly (series_id, hour, n, total, lo, hi) "
                f"SELECT series_id, CASE WHEN ts >= 0 THEN (ts / {h}) * {h} "
                f"ELSE ((ts - {h} + 1) / {h}) * {h} END, count(*), sum(val), min(val), "
                "max(val) FROM readings GROUP BY 1, 2"
            )
