"""The parts of the OpenAPI 3.1 document that are not per-operation (those live in the
endpoints' docstrings): info, security schemes, shared parameters and schemas."""

from __future__ import annotations

from typing import Any

__all__ = ["BASE_SCHEMA"]

_nullable_int = {"type": ["integer", "null"]}

BASE_SCHEMA: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "edgepipe cloud receiver",
        "version": "1",
        "description": "Receives signed batch uploads from edgepipe devices (sync wire protocol "
        "v1, docs/sync-protocol.md) and serves their data and sync status to operators.",
    },
    "components": {
        "securitySchemes": {
            "operatorBearer": {"type": "http", "scheme": "bearer"},
            "deviceSignature": {
                "type": "apiKey",
                "in": "header",
                "name": "X-Edgepipe-Signature",
                "description": "v1=<hex HMAC-SHA256(device secret, canonical request)>",
            },
        },
        "parameters": {
            "Name": {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            "DeviceFilter": {"name": "device", "in": "query", "schema": {"type": "string"}},
            "LogLimit": {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            },
            "Device": {
                "name": "X-Edgepipe-Device",
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
            },
            "Timestamp": {
                "name": "X-Edgepipe-Timestamp",
                "in": "header",
                "required": True,
                "description": "Unix seconds; must be within the allowed skew (300 s).",
                "schema": {"type": "string", "pattern": "^-?[0-9]+$"},
            },
            "Nonce": {
                "name": "X-Edgepipe-Nonce",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            },
            "Signature": {
                "name": "X-Edgepipe-Signature",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "pattern": "^v1=[0-9a-f]{64}$"},
            },
            "Link": {
                "name": "X-Edgepipe-Link",
                "in": "header",
                "schema": {"type": "string", "enum": ["wifi", "cellular", "ethernet", "unknown"]},
            },
        },
        "responses": {
            "Error": {
                "description": "Refused; nothing was stored.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "Overloaded": {
                "description": "Too busy; retry after the given number of seconds.",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                "required": ["error", "detail"],
            },
            "LogRecord": {
                "description": "One de-duplicated warning record of a device (docs/health.md).",
                "type": "object",
                "properties": {
                    "device": {"type": "string"},
                    "seq": {"type": "integer"},
                    "ts": {"type": "integer", "description": "first occurrence, ms (device clock)"},
                    "last": {"type": "integer", "description": "last occurrence, ms"},
                    "level": {"type": "string", "enum": ["WARNING", "ERROR", "CRITICAL"]},
                    "logger": {"type": "string"},
                    "msg": {"type": "string"},
                    "n": {"type": "integer", "description": "occurrences in this record"},
                },
                "required": ["device", "seq", "ts", "last", "level", "logger", "msg", "n"],
            },
            "SequenceConflict": {
                "allOf": [
                    {"$ref": "#/components/schemas/Error"},
                    {
                        "type": "object",
                        "properties": {
                            "error": {"const": "sequence_conflict"},
                            "seq": {"type": "integer"},
                        },
                        "required": ["seq"],
                    },
                ]
            },
            "Acks": {
                "type": "object",
                "properties": {
                    "acked": {"type": "array", "items": {"type": "integer"}},
                    "duplicates": {"type": "array", "items": {"type": "integer"}},
                },
                "required": ["acked", "duplicates"],
            },
            "Device": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "created_ms": {"type": "integer"},
                    "last_seen_ms": _nullable_int,
                    "last_sync_ms": _nullable_int,
                    "link": {"type": ["string", "null"]},
                    "last_seq": _nullable_int,
                    "reported": {
                        "description": "Status the device reported with its last upload.",
                        "type": ["object", "null"],
                        "properties": {
                            "backlog_batches": {"type": "integer"},
                            "backlog_readings": {"type": "integer"},
                            "oldest_unsynced_ms": _nullable_int,
                            "dead_letters": {"type": "integer"},
                            "link": {"type": "string"},
                        },
                    },
                    "last_error": {"type": ["string", "null"]},
                    "last_error_ms": _nullable_int,
                    "today": {
                        "type": "object",
                        "description": "Received since 00:00 UTC.",
                        "properties": {
                            "readings": {"type": "integer"},
                            "bytes": {"type": "integer"},
                            "uploads": {"type": "integer"},
                        },
                    },
                },
                "required": ["name", "created_ms", "today"],
            },
            "Metric": {
                "type": "object",
                "properties": {
                    "source": {"type": "string"},
                    "metric": {"type": "string"},
                    "tags": {
                        "type": ["object", "null"],
                        "additionalProperties": {"type": "string"},
                    },
                    "count": {"type": "integer"},
                    "first_ts": _nullable_int,
                    "last_ts": _nullable_int,
                },
            },
            "Readings": {
                "type": "object",
                "properties": {
                    "device": {"type": "string"},
                    "since": {"type": "integer"},
                    "until": {"type": "integer"},
                    "step": {
                        "type": ["integer", "null"],
                        "description": "Bucket width in ms, null for raw rows.",
                    },
                    "truncated": {"type": "boolean"},
                    "rows": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "description": "Raw: ts, value, flags. Downsampled: ts (bucket "
                            "start), avg, min, max, count.",
                            "properties": {
                                "source": {"type": "string"},
                                "metric": {"type": "string"},
                                "tags": {"type": ["object", "null"]},
                                "ts": {"type": "integer"},
                                "value": {"type": "number"},
                                "flags": {"type": "integer"},
                                "avg": {"type": "number"},
                                "min": {"type": "number"},
                                "max": {"type": "number"},
                                "count": {"type": "integer"},
                            },
                        },
                    },
                },
                "required": ["device", "since", "until", "step", "truncated", "rows"],
            },
            "Rejection": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "device": {"type": ["string", "null"]},
                    "ts_ms": {"type": "integer"},
                    "reason": {"type": "string"},
                    "detail": {"type": "string"},
                    "remote": {"type": ["string", "null"]},
                },
            },
            "Alert": {
                "type": "object",
                "description": "One alert (docs/alerts.md): its key is rule:device[:stage].",
                "properties": {
                    "key": {"type": "string"},
                    "rule": {"type": "string"},
                    "kind": {
                        "type": "string",
                        "enum": [
                            "store_full",
                            "breaker_open",
                            "session_lost",
                            "clock_skew",
                            "silent",
                            "no_readings",
                        ],
                    },
                    "device": {"type": "string"},
                    "severity": {"type": "string", "enum": ["critical", "warning", "info"]},
                    "state": {"type": "string", "enum": ["firing", "resolved"]},
                    "summary": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "value": {"type": ["number", "null"]},
                    "started_ms": {"type": "integer"},
                    "updated_ms": {"type": "integer"},
                    "resolved_ms": _nullable_int,
                    "notified": {
                        "type": ["string", "null"],
                        "description": "The state every webhook has received.",
                    },
                },
                "required": ["key", "rule", "kind", "device", "severity", "state", "summary"],
            },
            "AlertEngine": {
                "type": ["object", "null"],
                "properties": {
                    "evaluate_every_s": {"type": "number"},
                    "evaluations": {"type": "integer"},
                    "last_evaluation_ms": _nullable_int,
                    "last_error": {"type": ["string", "null"]},
                    "rules": {"type": "array", "items": {"type": "object"}},
                    "webhooks": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "url": {"type": "string"},
                                "format": {"type": "string"},
                                "queued": {"type": "integer"},
                                "queue_max": {"type": "integer"},
                                "sent": {"type": "integer"},
                                "failures": {"type": "integer"},
                                "dropped": {"type": "integer"},
                                "refused": {"type": "integer"},
                                "last_error": {"type": ["string", "null"]},
                                "last_ok_ms": _nullable_int,
                            },
                        },
                    },
                },
            },
            "DeadLetter": {
                "type": "object",
                "properties": {
                    "device": {"type": "string"},
                    "seq": {"type": "integer"},
                    "ts": {"type": "integer"},
                    "topic": {"type": "string"},
                    "stage": {"type": ["string", "null"]},
                    "reason": {"type": "string"},
                    "size": {"type": "integer"},
                    "received_ms": {"type": "integer"},
                },
            },
        },
    },
}
