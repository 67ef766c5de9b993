"""``pipeline.yaml``: the configuration models.

These pydantic models only *describe* a pipeline (unknown keys are errors); the runtime
objects are made from them by each component's ``build()``.  Loading goes through
:func:`load_config`, which maps every validation error back to the YAML node it came from
(``pipeline.yaml:LINE:COL: message``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

__all__ = [
    "BatchConfig",
    "BrokerConfig",
    "DeviceConfig",
    "LimitsConfig",
    "MatchConfig",
    "MetricsConfig",
    "PipelineConfig",
    "Secret",
    "StageConfig",
    "StoreConfig",
    "SubscriptionConfig",
    "SyncBundlesConfig",
    "SyncConfig",
    "SyncLinksConfig",
    "SyncMeteredConfig",
    "TLSConfig",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- secrets -------------------------------------------------------------------------


class Secret(_Model):
    """A secret given inline, from a file, or from an environment variable.

    In YAML: ``password: hunter2`` or ``password: {file: /run/secrets/mqtt}`` or
    ``password: {env: MQTT_PASSWORD}``.  The value is read when it is needed, never
    printed (``repr`` is masked), and trailing newlines of files are stripped.
    """

    value: str | None = Field(default=None, repr=False)
    file: Path | None = None
    env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_scalar(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"value": data}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> Secret:
        given = [n for n in ("value", "file", "env") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of a literal value, `file:` or `env:`")
        return self

    def describe(self) -> str:
        if self.file is not None:
            return f"file {self.file}"
        if self.env is not None:
            return f"environment variable {self.env}"
        return "inline value"

    def get(self) -> str:
        """The secret's value; raises ``LookupError`` (without the value) if unavailable."""
        if self.value is not None:
            return self.value
        if self.env is not None:
            try:
                return os.environ[self.env]
            except KeyError:
                raise LookupError(f"environment variable {self.env} is not set") from None
        assert self.file is not None
        try:
            return self.file.read_text().rstrip("\r\n")
        except OSError as e:
            raise LookupError(f"cannot read secret file {self.file}: {e.strerror}") from None


# -- sections ------------------------------------------------------------------------


class DeviceConfig(_Model):
    id: str = Field(
        default_factory=lambda: os.environ.get("EDGEPIPE_DEVICE_ID") or os.uname().nodename,
        description="This device's name: used for uploads and bound into every ciphertext.",
        min_length=1,
        max_length=128,
    )


class TLSConfig(_Model):
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="client private key (mutual TLS)")
    insecure: bool = Field(False, description="skip hostname verification (testing only)")

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class BrokerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["3.1.1", "5"] = "5"
    client_id: str | None = Field(
        None,
        description="MQTT client id; defaults to 'edgepipe-<device id>'. Must be stable "
        "for the persistent session to survive restarts.",
    )
    keepalive: int = Field(30, ge=5, le=3600, description="seconds")
    username: str | None = None
    password: Secret | None = None
    tls: TLSConfig | None = None
    session_expiry: int = Field(
        86400,
        ge=0,
        description="MQTT 5 session expiry interval in seconds: how long the broker "
        "keeps queuing QoS 1 messages while edgepipe is down",
    )
    receive_maximum: int = Field(
        1000,
        ge=1,
        le=65535,
        description="MQTT 5 Receive Maximum: unacknowledged QoS 1 messages the broker may send",
    )
    max_packet_kb: int = Field(
        1024,
        ge=1,
        le=262_144,
        description="MQTT 5 Maximum Packet Size: the broker drops larger messages instead of "
        "sending them (bounds edgepipe's memory); payloads between batch.max_payload_bytes "
        "and this are dead-lettered",
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect backoff (full jitter)")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest reconnect backoff")
    redelivery_window_s: float = Field(
        10.0,
        ge=0,
        description="after every (re)connect, messages received for this long are checked "
        "against the store even without the DUP flag (a broker restored from its "
        "persistence file may resend what was delivered before without DUP)",
    )
    status_topic: str | None = Field(
        "edgepipe/{device}/status",
        description="retained online/offline status and Last Will topic ({device} expands)",
    )


class SubscriptionConfig(_Model):
    topic: str = Field(
        description="topic template: MQTT filter where {device} and {metric} match one level "
        "each, e.g. 'sensors/{device}/{metric}'. '$share/GROUP/' prefixes are allowed."
    )
    qos: Literal[0, 1] = 1
    format: Literal["auto", "json", "msgpack", "senml", "number"] = "auto"
    device: str | None = Field(None, description="fixed device name when the topic has none")
    metric: str | None = Field(None, description="fixed metric name for numeric payloads")
    timestamp: Literal["payload", "arrival"] = Field(
        "payload", description="where a reading's time comes from (payload falls back to arrival)"
    )
    timestamp_field: str = "ts"
    id_field: str | None = Field(
        "seq", description="payload field that identifies a message for de-duplication"
    )


class BatchConfig(_Model):
    max_messages: int = Field(500, ge=1, le=100_000, description="messages per group commit")
    max_delay_ms: int = Field(
        5,
        ge=0,
        le=60_000,
        description="longest time the oldest message of a batch waits for the batch to fill "
        "(5 ms: p99 publish->commit 7 ms at 1,000 msg/s, 6x fewer fsyncs than 0; "
        "docs/ingest.md)",
    )
    max_pending: int = Field(
        5000, ge=1, description="messages buffered before edgepipe stops reading the socket"
    )
    max_payload_bytes: int = Field(65536, ge=16, description="larger payloads are dead-lettered")


class LimitsConfig(_Model):
    fuel: int | None = Field(50_000_000, ge=1000, description="Wasm fuel per batch (None: off)")
    timeout_ms: int = Field(200, ge=1, description="wall-clock deadline per batch (epoch)")
    memory_mb: int = Field(
        16,
        ge=1,
        le=64,
        description="linear memory cap (at most 64 MiB: one stage must not be able to take "
        "a small device's memory)",
    )
    max_output: int = Field(
        65536, ge=1, le=1_000_000, description="most records one batch may emit"
    )
    module_max_kb: int = Field(
        4096,
        ge=1,
        le=16384,
        description="largest accepted module (compiling is bounded: see filters/ABI.md)",
    )
    stop_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="on_error: stop: attempts at a batch (each on a fresh instance) before "
        "the stage's input is quarantined as a dead letter and the pipeline goes on",
    )
    breaker_failures: int = Field(
        5, ge=1, description="consecutive failed batches that trip the stage's circuit breaker"
    )
    breaker_cooldown_s: float = Field(
        30.0, gt=0, description="how long a tripped stage is bypassed (on_error path)"
    )


class MatchConfig(_Model):
    devices: list[str] | None = Field(None, description="glob patterns; None matches all")
    metrics: list[str] | None = Field(None, description="glob patterns; None matches all")


class StageConfig(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    module: Path = Field(description="path of the .wasm module, relative to the config file")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    kind: Literal["filter", "map", "filter_map", "expand", "aggregate"] = "filter_map"
    match: MatchConfig = MatchConfig()
    config: dict[str, Any] = Field(default_factory=dict)
    limits: LimitsConfig = LimitsConfig()
    on_error: Literal["dead_letter", "pass", "stop"] = "dead_letter"


def unique_stage_names(chain: list[StageConfig]) -> list[StageConfig]:
    """Validator of a ``chain:`` list (in pipeline.yaml and in a filters file)."""
    seen: set[str] = set()
    for stage in chain:
        if stage.name in seen:
            raise ValueError(f"stage name {stage.name!r} is used twice")
        seen.add(stage.name)
    return chain


class StoreConfig(_Model):
    path: Path = Path("edgepipe-store.db")
    key: Secret | None = Field(
        None,
        description="store keyring ('<key id> <base64url 32 bytes>' per line, last = active): "
        "a file (mode 0600, or a Kubernetes Secret mount), `env:` or inline. Required.",
    )
    quota_mb: float = Field(
        1024, gt=0, description="most MiB of live data; synced batches are evicted first"
    )
    on_full: Literal["drop_oldest", "backpressure"] = Field(
        "backpressure",
        description="at the quota with only unsynced data left: drop the oldest unsynced "
        "batches (counted), or stop acknowledging so the broker buffers",
    )
    synchronous: Literal["FULL", "EXTRA"] = Field(
        "FULL", description="SQLite sync level; FULL: a commit (then the ack) survives power loss"
    )
    reencrypt: bool = Field(
        True,
        description="after a key rotation, re-seal older rows under the active key in the "
        "background (small transactions; a restart resumes)",
    )


LinkKind = Literal["wifi", "cellular", "ethernet"]


class SyncLinksConfig(_Model):
    """Which network link is up, from the interface state in sysfs (polled cheaply)."""

    sysfs_root: Path = Field(Path("/sys"), description="where /sys is mounted (tests: a fake tree)")
    interfaces: dict[LinkKind, list[str]] = Field(
        default_factory=lambda: {
            "ethernet": ["eth*", "en*"],
            "wifi": ["wlan*", "wl*"],
            "cellular": ["wwan*", "usb*", "ppp*"],
        },
        description="interface name patterns (fnmatch) per link kind",
    )
    prefer: list[LinkKind] = Field(
        default_factory=lambda: ["ethernet", "wifi", "cellular"],
        description="when several links are up, the first one here is the one reported",
    )
    metered: list[LinkKind] = Field(
        default_factory=lambda: ["cellular"],
        description="links paid by the byte: daily budget and priority order apply",
    )
    poll_s: float = Field(1.0, gt=0, le=60, description="how often interface state is read")


class SyncMeteredConfig(_Model):
    """What is uploaded over a metered link, in which order, and how much per day."""

    daily_budget_mb: float | None = Field(
        50.0, gt=0, description="bytes on the wire per metered link per UTC day (None: no cap)"
    )
    priority: list[Literal["alerts", "recent", "bulk"]] = Field(
        default_factory=lambda: ["alerts", "recent"],
        description="classes uploaded over a metered link, in this order: alerts = batches "
        "with a flagged reading, recent = newer than recent_hours, bulk = everything else. "
        "Classes left out wait for an unmetered link.",
    )
    recent_hours: float = Field(24.0, gt=0)

    @field_validator("priority")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each class may appear once")
        return v


def _public_key_lines(lines: list[str]) -> list[str]:
    from protocol._bundle import PublicKey

    out = []
    for i, line in enumerate(lines):
        try:
            out.append(PublicKey.parse(line).line)
        except ValueError as e:
            raise ValueError(f"key {i + 1}: {e}") from None
    return out


class SyncBundlesConfig(_Model):
    """Signed chain bundles pulled from the receiver (docs/rollout.md).  Off until at least
    one trusted key is given."""

    trusted_keys: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="the fleet's public signing keys ('<key id> <base64url>', as "
        "`edgepipe-cloud signing-key list` prints them); a bundle signed by any other key "
        "is refused",
    )
    retired_keys: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="keys no longer trusted: a bundle signed by one is refused (retired_key) "
        "even if it is also in trusted_keys",
    )
    fleet: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="the fleet id bundles must name (the receiver's EDGEPIPE_CLOUD_FLEET)",
    )
    chain_source: Literal["cloud", "local"] = Field(
        "cloud",
        description="cloud: an applied bundle's chain (kept beside the store, on the writable "
        "volume) replaces the chain_file's; local: chain_file (e.g. a ConfigMap) wins and "
        "bundles are refused (chain_source_local)",
    )
    check_every_s: float = Field(
        60.0, ge=1, description="how often the sync worker asks for its desired bundle"
    )

    @field_validator("trusted_keys", "retired_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        return _public_key_lines(v)

    @property
    def enabled(self) -> bool:
        return bool(self.trusted_keys)


class SyncConfig(_Model):
    enabled: bool = True
    url: str = Field("http://127.0.0.1:8750", description="base URL of the cloud receiver")
    device_secret: Secret | None = None
    ca_file: Path | None = Field(None, description="CA bundle that signed the receiver's cert")
    compression: Literal["zstd", "gzip", "none"] = "zstd"
    batches_per_request: int = Field(16, ge=1, le=1000)
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="uncompressed batch bytes per request"
    )
    interval_s: float = Field(2.0, gt=0, description="idle poll when nothing new was committed")
    health_interval_s: float = Field(
        60.0,
        ge=1,
        le=3600,
        description="how often a health snapshot and the warnings collected are stored for "
        "the cloud (docs/health.md)",
    )
    timeout_s: float = Field(15.0, gt=0)
    backoff_min_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    links: SyncLinksConfig = SyncLinksConfig()
    metered: SyncMeteredConfig = SyncMeteredConfig()
    state_file: Path | None = Field(
        None, description="sync status file (default: next to the store, <store>.sync.json)"
    )
    bundles: SyncBundlesConfig = SyncBundlesConfig()


class MetricsConfig(_Model):
    listen: str | None = Field("127.0.0.1:9108", description="host:port of /metrics, /healthz")


class PipelineConfig(_Model):
    """The root of pipeline.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="edgepipe pipeline.yaml")

    version: Literal[1] = 1
    device: DeviceConfig = Field(default_factory=DeviceConfig)
    broker: BrokerConfig = BrokerConfig()
    subscriptions: Annotated[list[SubscriptionConfig], Field(min_length=1)]
    batch: BatchConfig = BatchConfig()
    chain: list[StageConfig] = Field(default_factory=list)
    chain_file: Path | None = Field(
        None,
        description="a separate filters file holding the chain (watched and hot-swapped; "
        "`edgepipe deploy` installs it); excludes an inline `chain:`",
    )
    store: StoreConfig = StoreConfig()
    sync: SyncConfig = SyncConfig()
    metrics: MetricsConfig = MetricsConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("chain")
    @classmethod
    def _unique_stage_names(cls, chain: list[StageConfig]) -> list[StageConfig]:
        return unique_stage_names(chain)

    # Where relative paths in the file are resolved from, the file as shown in messages
    # and the (line, col) of every node by key path (set by load_config).
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="pipeline.yaml")
    _locs: dict[tuple[Any, ...], tuple[int, int]] = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> str:
        """The file this config was loaded from, as messages name it."""
        return self._source

    @property
    def locations(self) -> dict[tuple[Any, ...], tuple[int, int]]:
        """(line, col) of each YAML node by key path, e.g. ``("chain", 0, "config")``."""
        return self._locs

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self._base_dir / path)
