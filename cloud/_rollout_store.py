"""The rollouts role: device labels and staged rollouts of a bundle to a labelled group
(docs/rollout.md).  The state machine that drives a rollout is :mod:`cloud._rollout`; this
module only stores what it decides, so a rollout survives a restart of the receiver.

* a device's *labels* are ``key=value`` pairs (bounded: :data:`MAX_LABELS` per device, keys
  and values of :data:`LABEL_KEY` / :data:`LABEL_VALUE`);
* a *rollout* sends one bundle version to the devices of one group (``key=value``), wave by
  wave; its devices are fixed when it starts, each with its wave, its state and what it ran
  before (to return to it);
* every step is an *event* of the rollout's timeline (bounded: :data:`ROLLOUT_EVENTS_KEEP`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol, runtime_checkable

from ._errors import CloudError
from ._sql import SQLBase

__all__ = [
    "ACTIVE_STATES",
    "DEVICE_STATES",
    "LABEL_KEY",
    "LABEL_VALUE",
    "MAX_LABELS",
    "ROLLOUT_STATES",
    "BadLabel",
    "RolloutConflict",
    "Rollouts",
    "RolloutsSQL",
    "UnknownRollout",
    "parse_label",
    "rollout_ddl",
]

MAX_LABELS = 32
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
LABEL_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
ROLLOUT_EVENTS_KEEP = 2000
#: running: waves proceed; paused: no new wave (gates still watched, rollbacks still made);
#: halted: a gate failed, rolling back; rolled_back, aborted, done: finished.
ROLLOUT_STATES = ("running", "paused", "halted", "rolled_back", "aborted", "done")
ACTIVE_STATES = ("running", "paused", "halted")
DEVICE_STATES = (
    "pending",
    "downloading",
    "applied",
    "healthy",
    "failed",
    "rolling_back",
    "rolled_back",
    "skipped",
)


class BadLabel(CloudError):
    def __init__(self, text: str, why: str) -> None:
        self.text, self.why = text, why
        super().__init__(f"label {text[:80]!r}: {why}")


class UnknownRollout(CloudError):
    def __init__(self, rollout_id: int) -> None:
        self.rollout_id = rollout_id
        super().__init__(f"no rollout {rollout_id}")


class RolloutConflict(CloudError):
    """Another active rollout covers some of the same devices."""

    def __init__(self, other: int, devices: list[str]) -> None:
        self.other, self.devices = other, devices
        shown = ", ".join(devices[:5]) + (" ..." if len(devices) > 5 else "")
        super().__init__(
            f"rollout {other} is still active on {len(devices)} of these devices ({shown}): "
            f"wait for it to finish, or 'edgepipe-cloud rollout abort {other}'"
        )


def parse_label(text: str, *, value: bool = True) -> tuple[str, str]:
    """``key=value`` (or just ``key`` with ``value=False``) -> (key, value); :class:`BadLabel`."""
    if not value:
        if not LABEL_KEY.fullmatch(text):
            raise BadLabel(text, "a key is 1-63 of letters, digits, '.', '_', '/', '-'")
        return text, ""
    key, sep, val = text.partition("=")
    if not sep:
        raise BadLabel(text, "expected KEY=VALUE")
    if not LABEL_KEY.fullmatch(key):
        raise BadLabel(text, "the key must be 1-63 of letters, digits, '.', '_', '/', '-'")
    if not LABEL_VALUE.fullmatch(val):
        raise BadLabel(text, "the value must be 1-63 of letters, digits, '.', '_', '-'")
    return key, val


def rollout_ddl(pk: str) -> list[str]:
    """The role's tables (created by :mod:`cloud._schema` with the others)."""
    return [
        """CREATE TABLE IF NOT EXISTS device_labels (
            device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (device_id, key))""",
        "CREATE INDEX IF NOT EXISTS device_labels_kv ON device_labels (key, value)",
        f"""CREATE TABLE IF NOT EXISTS rollouts (
            id {pk},
            bundle_version BIGINT NOT NULL REFERENCES bundles(version),
            group_key TEXT NOT NULL,
            group_value TEXT NOT NULL,
            spec TEXT NOT NULL,
            state TEXT NOT NULL,
            reason TEXT,
            current_wave INTEGER NOT NULL,
            waves INTEGER NOT NULL,
            created_ms BIGINT NOT NULL,
            updated_ms BIGINT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS rollout_devices (
            rollout_id BIGINT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
            device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
            wave INTEGER NOT NULL,
            state TEXT NOT NULL,
            reason TEXT,
            previous_version BIGINT,
            previous_desired BIGINT,
            baseline TEXT,
            started_ms BIGINT,
            applied_ms BIGINT,
            rollback_version BIGINT,
            updated_ms BIGINT NOT NULL,
            PRIMARY KEY (rollout_id, device_id))""",
        "CREATE INDEX IF NOT EXISTS rollout_devices_device ON rollout_devices (device_id)",
        f"""CREATE TABLE IF NOT EXISTS rollout_events (
            id {pk},
            rollout_id BIGINT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
            ts_ms BIGINT NOT NULL,
            device TEXT,
            kind TEXT NOT NULL,
            detail TEXT)""",
        "CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events (rollout_id, id)",
    ]


_DEVICE_FIELDS = (
    "wave",
    "state",
    "reason",
    "previous_version",
    "previous_desired",
    "baseline",
    "started_ms",
    "applied_ms",
    "rollback_version",
)
_ROLLOUT_FIELDS = ("state", "reason", "current_wave", "spec")


@runtime_checkable
class Rollouts(Protocol):
    """Device labels and rollouts.  Every method blocks."""

    def set_labels(
        self,
        device: str,
        add: dict[str, str],
        remove: list[str] = (),  # type: ignore[assignment]
    ) -> dict[str, str]:
        """Set and remove labels of ``device``; -> its labels now.  :class:`BadLabel` (more
        than :data:`MAX_LABELS`), :class:`UnknownDevice`."""

    def device_labels(self) -> dict[str, dict[str, str]]:
        """Every labelled device's labels, by device name."""

    def devices_labelled(self, key: str, value: str) -> list[str]:
        """Names of the devices with label ``key=value``, sorted."""

    def create_rollout(
        self,
        version: int,
        group: tuple[str, str],
        spec: dict[str, Any],
        waves: list[list[str]],
        *,
        now: int,
    ) -> int:
        """Store a new running rollout with its devices (``waves[i]`` in wave ``i``, state
        pending); :class:`RolloutConflict` if an active rollout has any of them."""

    def rollout(self, rollout_id: int) -> dict[str, Any] | None:
        """A rollout with ``devices`` (each with its name, wave, state ...)."""

    def list_rollouts(self, *, active_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        """Rollouts newest first, without their devices but with counts per state."""

    def update_rollout(self, rollout_id: int, *, now: int, **fields: Any) -> None: ...

    def update_rollout_device(
        self, rollout_id: int, device: str, *, now: int, **fields: Any
    ) -> None: ...

    def rollout_event(
        self, rollout_id: int, kind: str, detail: str, *, device: str | None = None, now: int
    ) -> None: ...

    def rollout_events(self, rollout_id: int, *, limit: int = 2000) -> list[dict[str, Any]]:
        """The rollout's timeline, oldest first."""


class RolloutsSQL(SQLBase):
    # -- labels ----------------------------------------------------------------------------
    def set_labels(
        self,
        device: str,
        add: dict[str, str],
        remove: list[str] = (),  # type: ignore[assignment]
    ) -> dict[str, str]:
        for k, v in add.items():
            parse_label(f"{k}={v}")
        for k in remove:
            parse_label(k, value=False)
        q = self._q
        with self._write() as cur:
            did = self._device_id(cur, device, lock=True)
            for k in remove:
                cur.execute(
                    q("DELETE FROM device_labels WHERE device_id = ? AND key = ?"), (did, k)
                )
            for k, v in add.items():
                cur.execute(
                    q(
                        "INSERT INTO device_labels (device_id, key, value) VALUES (?, ?, ?) "
                        "ON CONFLICT (device_id, key) DO UPDATE SET value = excluded.value"
                    ),
                    (did, k, v),
                )
            cur.execute(
                q("SELECT key, value FROM device_labels WHERE device_id = ? ORDER BY key"), (did,)
            )
            labels = dict(cur.fetchall())
            if len(labels) > MAX_LABELS:
                raise BadLabel(
                    ", ".join(add), f"a device has at most {MAX_LABELS} labels ({len(labels)})"
                )  # raised inside the transaction: nothing is written
        return labels

    def device_labels(self) -> dict[str, dict[str, str]]:
        with self._read() as cur:
            cur.execute(
                "SELECT d.name, l.key, l.value FROM device_labels l JOIN devices d "
                "ON d.id = l.device_id ORDER BY d.name, l.key"
            )
            out: dict[str, dict[str, str]] = {}
            for name, k, v in cur.fetchall():
                out.setdefault(name, {})[k] = v
        return out

    def devices_labelled(self, key: str, value: str) -> list[str]:
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT d.name FROM device_labels l JOIN devices d ON d.id = l.device_id "
                    "WHERE l.key = ? AND l.value = ? ORDER BY d.name"
                ),
                (key, value),
            )
            return [r[0] for r in cur.fetchall()]

    # -- rollouts --------------------------------------------------------------------------
    def create_rollout(
        self,
        version: int,
        group: tuple[str, str],
        spec: dict[str, Any],
        waves: list[list[str]],
        *,
        now: int,
    ) -> int:
        q = self._q
        lock = f" {self.LOCK_ROW}" if self.LOCK_ROW else ""
        with self._write() as cur:
            # one rollout is created at a time (the overlap check below must see the others)
            cur.execute(f"SELECT version FROM schema_version{lock}")
            ids = {name: self._device_id(cur, name) for wave in waves for name in wave}
            marks = ", ".join("?" for _ in ids)
            cur.execute(
                q(
                    "SELECT r.id, d.name FROM rollout_devices rd JOIN rollouts r "
                    "ON r.id = rd.rollout_id JOIN devices d ON d.id = rd.device_id "
                    f"WHERE r.state IN ('running', 'paused', 'halted') AND rd.device_id IN ({marks}) "
                    "ORDER BY r.id, d.name"
                ),
                tuple(ids.values()),
            )
            clash = cur.fetchall()
            if clash:
                other = clash[0][0]
                raise RolloutConflict(other, [n for r, n in clash if r == other])
            cur.execute(
                q(
                    "INSERT INTO rollouts (bundle_version, group_key, group_value, spec, state, "
                    "current_wave, waves, created_ms, updated_ms) "
                    "VALUES (?, ?, ?, ?, 'running', -1, ?, ?, ?) RETURNING id"
                ),
                (
                    version,
                    group[0],
                    group[1],
                    json.dumps(spec, sort_keys=True),
                    len(waves),
                    now,
                    now,
                ),
            )
            rid = int(cur.fetchone()[0])
            for i, wave in enumerate(waves):
                for name in wave:
                    cur.execute(
                        q(
                            "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, "
                            "updated_ms) VALUES (?, ?, ?, 'pending', ?)"
                        ),
                        (rid, ids[name], i, now),
                    )
            self._rollout_event(
                cur, rid, now, None, "started", _started_detail(version, group, waves)
            )
        return rid

    _ROLLOUT_COLS = (
        "id, bundle_version, group_key, group_value, spec, state, reason, current_wave, waves, "
        "created_ms, updated_ms"
    )

    @staticmethod
    def _rollout_row(r: Any) -> dict[str, Any]:
        return {
            "id": r[0],
            "bundle_version": r[1],
            "group": f"{r[2]}={r[3]}",
            "spec": json.loads(r[4]),
            "state": r[5],
            "reason": r[6],
            "current_wave": r[7],
            "waves": r[8],
            "created_ms": r[9],
            "updated_ms": r[10],
        }

    def rollout(self, rollout_id: int) -> dict[str, Any] | None:
        q = self._q
        with self._read() as cur:
            cur.execute(q(f"SELECT {self._ROLLOUT_COLS} FROM rollouts WHERE id = ?"), (rollout_id,))
            r = cur.fetchone()
            if r is None:
                return None
            out = self._rollout_row(r)
            cols = ", ".join(f"rd.{c}" for c in _DEVICE_FIELDS)
            cur.execute(
                q(
                    f"SELECT d.name, {cols}, rd.updated_ms FROM rollout_devices rd JOIN devices d "
                    "ON d.id = rd.device_id WHERE rd.rollout_id = ? ORDER BY rd.wave, d.name"
                ),
                (rollout_id,),
            )
            devices = []
            for row in cur.fetchall():
                d = dict(zip(("device", *_DEVICE_FIELDS, "updated_ms"), row, strict=True))
                d["baseline"] = json.loads(d["baseline"]) if d["baseline"] else None
                devices.append(d)
        out["devices"] = devices
        return out

    def list_rollouts(self, *, active_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        where = "WHERE state IN ('running', 'paused', 'halted')" if active_only else ""
        with self._read() as cur:
            cur.execute(
                self._q(
                    f"SELECT {self._ROLLOUT_COLS} FROM rollouts {where} ORDER BY id DESC LIMIT ?"
                ),
                (max(1, min(limit, 1000)),),
            )
            rows = [self._rollout_row(r) for r in cur.fetchall()]
            if rows:
                marks = ", ".join("?" for _ in rows)
                cur.execute(
                    self._q(
                        "SELECT rollout_id, state, count(*) FROM rollout_devices "
                        f"WHERE rollout_id IN ({marks}) GROUP BY rollout_id, state"
                    ),
                    tuple(r["id"] for r in rows),
                )
                counts: dict[int, dict[str, int]] = {}
                for rid, state, n in cur.fetchall():
                    counts.setdefault(rid, {})[state] = n
                for r in rows:
                    r["counts"] = counts.get(r["id"], {})
        return rows

    def update_rollout(self, rollout_id: int, *, now: int, **fields: Any) -> None:
        if "spec" in fields:
            fields["spec"] = json.dumps(fields["spec"], sort_keys=True)
        self._update("rollouts", "id = ?", (rollout_id,), _ROLLOUT_FIELDS, fields, now, rollout_id)

    def update_rollout_device(
        self, rollout_id: int, device: str, *, now: int, **fields: Any
    ) -> None:
        if "baseline" in fields and fields["baseline"] is not None:
            fields["baseline"] = json.dumps(fields["baseline"], sort_keys=True)
        self._update(
            "rollout_devices",
            "rollout_id = ? AND device_id = (SELECT id FROM devices WHERE name = ?)",
            (rollout_id, device),
            _DEVICE_FIELDS,
            fields,
            now,
            rollout_id,
        )

    def _update(
        self,
        table: str,
        where: str,
        args: tuple[Any, ...],
        allowed: tuple[str, ...],
        fields: dict[str, Any],
        now: int,
        rollout_id: int,
    ) -> None:
        bad = set(fields) - set(allowed)
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} of {table}")
        if "reason" in fields and fields["reason"] is not None:
            fields["reason"] = str(fields["reason"])[:500]
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._write() as cur:
            cur.execute(
                self._q(f"UPDATE {table} SET {sets}, updated_ms = ? WHERE {where}"),
                (*fields.values(), now, *args),
            )
            if cur.rowcount != 1:
                raise UnknownRollout(rollout_id)

    def _rollout_event(
        self, cur: Any, rid: int, now: int, device: str | None, kind: str, detail: str
    ) -> None:
        q = self._q
        cur.execute(
            q(
                "INSERT INTO rollout_events (rollout_id, ts_ms, device, kind, detail) "
                "VALUES (?, ?, ?, ?, ?)"
            ),
            (rid, now, device, kind, detail[:500]),
        )
        cur.execute(
            q(
                "DELETE FROM rollout_events WHERE rollout_id = ? AND id <= (SELECT id FROM "
                "rollout_events WHERE rollout_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)"
            ),
            (rid, rid, ROLLOUT_EVENTS_KEEP),
        )

    def rollout_event(
        self, rollout_id: int, kind: str, detail: str, *, device: str | None = None, now: int
    ) -> None:
        with self._write() as cur:
            self._rollout_event(cur, rollout_id, now, device, kind, detail)

    def rollout_events(self, rollout_id: int, *, limit: int = 2000) -> list[dict[str, Any]]:
        with self._read() as cur:
            cur.execute(
                self._q(
                    "SELECT ts_ms, device, kind, detail FROM rollout_events WHERE rollout_id = ? "
                    "ORDER BY id LIMIT ?"
                ),
                (rollout_id, max(1, min(limit, ROLLOUT_EVENTS_KEEP))),
            )
            keys = ("ts_ms", "device", "kind", "detail")
            return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()]


def _started_detail(version: int, group: tuple[str, str], waves: list[list[str]]) -> str:
    sizes = " + ".join(str(len(w)) for w in waves)
    return (
        f"bundle {version} to {group[0]}={group[1]}: {sum(map(len, waves))} devices, waves {sizes}"
    )
