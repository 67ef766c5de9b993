"""The bundles role: signed chain bundles, their modules (stored once per sha256,
fleet-wide), what each device should run and what it reports (docs/rollout.md).

* a *bundle* is a signed manifest (:mod:`protocol._bundle`) with a version unique in the
  receiver's database, monotonic: :meth:`Bundles.next_bundle_version` is one above every
  version ever stored;
* a *module* is stored once by its sha256, whichever bundles name it;
* a device's *desired* bundle is set by :meth:`Bundles.set_desired` (``devices desire``, or
  the rollout engine), with a reason;
* its *reported* state comes with its signed check-in (``POST /v1/bundle``): the active
  version, when it was applied, the previous version, the status of the last attempt
  (``applied``, ``failed`` with a reason, ``downloading``) and per-stage health since the
  apply;
* every change of either is an *event* (a bounded history per device) that the rollout
  engine and the CLI read as a timeline.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

from protocol._bundle import Manifest

from ._errors import CloudError
from ._sql import SQLBase

__all__ = [
    "EVENTS_KEEP",
    "REPORT_STATUSES",
    "Bundles",
    "BundlesSQL",
    "BundleVersionTaken",
    "UnknownBundle",
]

#: Events kept per device (older ones are trimmed as new ones arrive).
EVENTS_KEEP = 500
REPORT_STATUSES = ("applied", "failed", "downloading", "waiting")


class UnknownBundle(CloudError):
    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(f"no bundle version {version}")


class BundleVersionTaken(CloudError):
    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(f"bundle version {version} exists already")


@runtime_checkable
class Bundles(Protocol):
    """Bundles, modules, desired and reported state per device.  Every method blocks."""

    def put_module(self, sha256: str, data: bytes) -> bool:
        """Store a module's bytes under its sha256 (the caller checked it); False if it was
        stored already (nothing written)."""

    def has_module(self, sha256: str) -> bool: ...

    def next_bundle_version(self) -> int: ...

    def add_bundle(
        self, manifest: Manifest, manifest_bytes: bytes, signature: bytes, *, now: int
    ) -> None:
        """Store a signed bundle; its modules must be stored (:class:`CloudError` naming the
        first missing one); :class:`BundleVersionTaken` if its version exists."""

    def list_bundles(self) -> list[dict[str, Any]]:
        """Every bundle, newest first, without its manifest bytes."""

    def get_bundle(self, version: int) -> dict[str, Any] | None:
        """A bundle with ``manifest`` (bytes), ``signature`` (bytes) and ``modules``."""

    def set_desired(self, device: str, version: int | None, reason: str, *, now: int) -> None:
        """What ``device`` should run (None: nothing new).  :class:`UnknownDevice`,
        :class:`UnknownBundle`."""

    def desired_bundle(self, device: str) -> dict[str, Any] | None:
        """The device's desired bundle as :meth:`get_bundle` returns it, or None."""

    def module_for_device(self, device: str, sha256: str) -> bytes | None:
        """A module's bytes if the bundle desired for ``device`` names it, else None."""

    def report_bundle_state(self, device: str, report: dict[str, Any], *, now: int) -> None:
        """Store a device's check-in (validated by the caller: ``cloud._bundle_wire``)."""

    def bundle_state(self, device: str) -> dict[str, Any] | None:
        """Desired and reported state of one device (None: unknown device)."""

    def bundle_states(self) -> list[dict[str, Any]]:
        """Desired and reported state of every device, by name."""

    def bundle_events(
        self, device: str | None = None, *, since: int | None = None, limit: int = 500
    ) -> list[dict[str, Any]]:
        """Desired changes and reports, oldest first."""

    def consume_nonce(self, device: str, nonce: str, expires: int, now: int) -> bool:
        """Remember a signed request's nonce until ``expires``; False if it was seen."""


_STATE_COLS = (
    "d.name, s.desired_version, s.desired_reason, s.desired_ms, s.active_version, "
    "s.previous_version, s.applied_ms, s.status, s.status_version, s.status_reason, "
    "s.status_detail, s.reported_ms, s.health, ab.filters_sha256"
)
#: ``bundles.filters_sha256`` of a local bundle (which has no filters text).
LOCAL_FILTERS = "local"


def _state_row(r: Any) -> dict[str, Any]:
    return {
        "device": r[0],
        "desired_version": r[1],
        "desired_reason": r[2],
        "desired_ms": r[3],
        "active_version": r[4],
        "previous_version": r[5],
        "applied_ms": r[6],
        "status": r[7],
        "status_version": r[8],
        "status_reason": r[9],
        "status_detail": r[10],
        "reported_ms": r[11],
        "health": json.loads(r[12]) if r[12] else None,
        "in_sync": r[1] is None or r[1] == r[4],
        # what the active version runs: its own chain, or the device's configured one
        "chain": None if r[4] is None else "local" if r[13] == LOCAL_FILTERS else "bundle",
    }


class BundlesSQL(SQLBase):
    # -- modules ---------------------------------------------------------------------------
    def put_module(self, sha256: str, data: bytes) -> bool:
        with self._write() as cur:
            cur.execute(
                self._q(
                    "INSERT INTO bundle_modules (sha256, size, data) VALUES (?, ?, ?) "
                    "ON CONFLICT (sha256) DO NOTHING"
                ),
                (sha256, len(data), data),
            )
            return cur.rowcount == 1

    def has_module(self, sha256: str) -> bool:
        with self._read() as cur:
            cur.execute(self._q("SELECT 1 FROM bundle_modules WHERE sha256 = ?"), (sha256,))
            return cur.fetchone() is not None

    # -- bundles ---------------------------------------------------------------------------
    def next_bundle_version(self) -> int:
        with self._read() as cur:
            cur.execute("SELECT max(version) FROM bundles")
            row = cur.fetchone()
        return (row[0] or 0) + 1

    def add_bundle(
        self, manifest: Manifest, manifest_bytes: bytes, signature: bytes, *, now: int
    ) -> None:
        q = self._q
        with self._write() as cur:
            for m in manifest.modules:
                cur.execute(q("SELECT size FROM bundle_modules WHERE sha256 = ?"), (m.sha256,))
                row = cur.fetchone()
                if row is None or row[0] != m.size:
                    raise CloudError(f"module {m.path} ({m.sha256}) is not stored")
            cur.execute(
                q(
                    "INSERT INTO bundles (version, fleet, priority, key_id, not_before, "
                    "not_after, created_ms, filters_sha256, total_bytes, manifest, signature) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (version) DO NOTHING"
                ),
                (
                    manifest.version,
                    manifest.fleet,
                    manifest.priority,
                    manifest.key_id,
                    manifest.not_before,
                    manifest.not_after,
                    now,
                    LOCAL_FILTERS if manifest.is_local else manifest.filters_sha256,
                    manifest.total_bytes,
                    manifest_bytes.decode("ascii"),
                    signature.hex(),
                ),
            )
            if cur.rowcount != 1:
                raise BundleVersionTaken(manifest.version)
            for m in manifest.modules:
                cur.execute(
                    q("INSERT INTO bundle_files (version, path, sha256) VALUES (?, ?, ?)"),
                    (manifest.version, m.path, m.sha256),
                )

    _BUNDLE_COLS = (
        "version, fleet, priority, key_id, not_before, not_after, created_ms, "
        "filters_sha256, total_bytes"
    )

    @staticmethod
    def _bundle_row(r: Any) -> dict[str, Any]:
        keys = (
            "version",
            "fleet",
            "priority",
            "key_id",
            "not_before",
            "not_after",
            "created_ms",
            "filters_sha256",
            "total_bytes",
        )
        return dict(zip(keys, r, strict=False))

    def list_bundles(self) -> list[dict[str, Any]]:
        with self._read() as cur:
            cur.execute(
                f"SELECT {self._BUNDLE_COLS}, (SELECT count(*) FROM bundle_files f "
                "WHERE f.version = b.version) FROM bundles b ORDER BY version DESC"
            )
            rows = cur.fetchall()
        return [{**self._bundle_row(r), "modules": r[9]} for r in rows]

    def _get_bundle(self, cur: Any, version: int) -> dict[str, Any] | None:
        q = self._q
        cur.execute(
            q(f"SELECT {self._BUNDLE_COLS}, manifest, signature FROM bundles WHERE version = ?"),
            (version,),
        )
        r = cur.fetchone()
        if r is None:
            return None
        out = self._bundle_row(r)
        out["manifest"] = r[9].encode("ascii")
        out["signature"] = bytes.fromhex(r[10])
        cur.execute(
            q("SELECT path, sha256 FROM bundle_files WHERE version = ? ORDER BY path"), (version,)
        )
        out["modules"] = [{"path": p, "sha256": s} for p, s in cur.fetchall()]
        return out

    def get_bundle(self, version: int) -> dict[str, Any] | None:
        with self._read() as cur:
            return self._get_bundle(cur, version)

    # -- desired ---------------------------------------------------------------------------
    def _ensure_state(self, cur: Any, did: int) -> None:
        cur.execute(
            self._q(
                "INSERT INTO device_bundle (device_id) VALUES (?) ON CONFLICT (device_id) "
                "DO NOTHING"
            ),
            (did,),
        )

    def _event(
        self,
        cur: Any,
        did: int,
        now: int,
        kind: str,
        version: int | None,
        reason: str | None,
        detail: str | None = None,
    ) -> None:
        q = self._q
        cur.execute(
            q(
                "INSERT INTO bundle_events (device_id, ts_ms, kind, version, reason, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)"
            ),
            (did, now, kind, version, reason, detail),
        )
        cur.execute(
            q(
                "DELETE FROM bundle_events WHERE device_id = ? AND id <= (SELECT id FROM "
                "bundle_events WHERE device_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)"
            ),
            (did, did, EVENTS_KEEP),
        )

    def set_desired(self, device: str, version: int | None, reason: str, *, now: int) -> None:
        q = self._q
        with self._write() as cur:
            did = self._device_id(cur, device, lock=True)
            if version is not None:
                cur.execute(q("SELECT 1 FROM bundles WHERE version = ?"), (version,))
                if cur.fetchone() is None:
                    raise UnknownBundle(version)
            self._ensure_state(cur, did)
            cur.execute(
                q(
                    "UPDATE device_bundle SET desired_version = ?, desired_reason = ?, "
                    "desired_ms = ? WHERE device_id = ?"
                ),
                (version, reason[:500], now, did),
            )
            self._event(cur, did, now, "desired", version, reason[:500])

    def desired_bundle(self, device: str) -> dict[str, Any] | None:
        q = self._q
        with self._read() as cur:
            cur.execute(
                q(
                    "SELECT s.desired_version FROM device_bundle s JOIN devices d "
                    "ON d.id = s.device_id WHERE d.name = ?"
                ),
                (device,),
            )
            row = cur.fetchone()
            if row is None or row[0] is None:
                return None
            return self._get_bundle(cur, row[0])

    def module_for_device(self, device: str, sha256: str) -> bytes | None:
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT m.data FROM devices d JOIN device_bundle s ON s.device_id = d.id "
                    "JOIN bundle_files f ON f.version = s.desired_version "
                    "JOIN bundle_modules m ON m.sha256 = f.sha256 "
                    "WHERE d.name = ? AND f.sha256 = ? LIMIT 1"
                ),
                (device, sha256),
            )
            row = cur.fetchone()
        return bytes(row[0]) if row else None

    # -- reported --------------------------------------------------------------------------
    def report_bundle_state(self, device: str, report: dict[str, Any], *, now: int) -> None:
        q = self._q
        with self._write() as cur:
            did = self._device_id(cur, device, lock=True)
            self._ensure_state(cur, did)
            cur.execute(
                q(
                    "SELECT active_version, status, status_version, status_reason "
                    "FROM device_bundle WHERE device_id = ?"
                ),
                (did,),
            )
            before = cur.fetchone()
            health = report.get("health")
            cur.execute(
                q(
                    "UPDATE device_bundle SET active_version = ?, previous_version = ?, "
                    "applied_ms = ?, status = ?, status_version = ?, status_reason = ?, "
                    "status_detail = ?, reported_ms = ?, health = ? WHERE device_id = ?"
                ),
                (
                    report.get("active_version"),
                    report.get("previous_version"),
                    report.get("applied_ms"),
                    report.get("status"),
                    report.get("version"),
                    report.get("reason"),
                    report.get("detail"),
                    now,
                    json.dumps(health, separators=(",", ":"), sort_keys=True)
                    if health is not None
                    else None,
                    did,
                ),
            )
            after = (
                report.get("active_version"),
                report.get("status"),
                report.get("version"),
                report.get("reason"),
            )
            if tuple(before) != after and report.get("status") is not None:
                self._event(
                    cur,
                    did,
                    now,
                    str(report["status"]),
                    report.get("version"),
                    report.get("reason"),
                    report.get("detail"),
                )

    def _states(self, where: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        with self._read() as cur:
            cur.execute(
                self._q(
                    f"SELECT {_STATE_COLS} FROM devices d LEFT JOIN device_bundle s "
                    "ON s.device_id = d.id LEFT JOIN bundles ab ON ab.version = s.active_version "
                    f"{where} ORDER BY d.name"
                ),
                args,
            )
            return [_state_row(r) for r in cur.fetchall()]

    def bundle_state(self, device: str) -> dict[str, Any] | None:
        rows = self._states("WHERE d.name = ?", (device,))
        return rows[0] if rows else None

    def bundle_states(self) -> list[dict[str, Any]]:
        return self._states("", ())

    def bundle_events(
        self, device: str | None = None, *, since: int | None = None, limit: int = 500
    ) -> list[dict[str, Any]]:
        clauses, args = [], []
        if device is not None:
            clauses.append("d.name = ?")
            args.append(device)
        if since is not None:
            clauses.append("e.ts_ms >= ?")
            args.append(since)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT d.name, e.ts_ms, e.kind, e.version, e.reason, e.detail FROM "
                    f"bundle_events e JOIN devices d ON d.id = e.device_id {where} "
                    "ORDER BY e.id LIMIT ?"
                ),
                (*args, max(1, min(limit, 5000))),
            )
            keys = ("device", "ts_ms", "kind", "version", "reason", "detail")
            return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()]

    # -- nonces of check-ins and module downloads ---------------------------------------------
    def consume_nonce(self, device: str, nonce: str, expires: int, now: int) -> bool:
        """Remember ``nonce`` for ``device``; False if it was seen (a replay)."""
        q = self._q
        with self._write() as cur:
            did = self._device_id(cur, device)
            cur.execute(q("DELETE FROM nonces WHERE device_id = ? AND expires_ms < ?"), (did, now))
            cur.execute(
                q(
                    "INSERT INTO nonces (device_id, nonce, expires_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (device_id, nonce) DO NOTHING"
                ),
                (did, nonce, expires),
            )
            return cur.rowcount == 1
