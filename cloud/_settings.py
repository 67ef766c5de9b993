"""Receiver settings: pydantic-settings models (``extra="forbid"``), from arguments or the
environment (``EDGEPIPE_CLOUD_<FIELD>``; an empty variable counts as unset).

Constructing a model takes only the values given; :meth:`Settings.from_env` (and
:meth:`DashboardSettings.from_env`) add the environment, read by pydantic-settings'
environment source.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

__all__ = ["ENV_PREFIX", "DashboardSettings", "Settings"]

ENV_PREFIX = "EDGEPIPE_CLOUD_"
MiB = 1024 * 1024


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (``os.environ`` unless
    told otherwise)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = self._environ
        if not self.case_sensitive:
            env = {k.lower(): v for k, v in env.items()}
        return {k: v for k, v in env.items() if not (self.env_ignore_empty and v == "")}


class _EnvModel(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The values given, nothing else: the environment is read by ``from_env`` alone.
        return (init_settings,)

    @classmethod
    def _from_environment(cls, environ: Mapping[str, str] | None) -> dict[str, Any]:
        return _Environment(cls, os.environ if environ is None else environ)()


class Settings(_EnvModel):
    """Everything the receiver can be told.  Each field can also come from the environment as
    ``EDGEPIPE_CLOUD_<FIELD>`` (e.g. ``EDGEPIPE_CLOUD_API_TOKEN``, ``EDGEPIPE_CLOUD_DB``)."""

    db: str = "sqlite:///edgepipe-cloud.db"
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: Largest request body accepted, as sent (compressed).
    max_body_bytes: int = Field(8 * MiB, ge=1024)
    #: Largest body after decompression (zip-bomb guard).
    max_decompressed_bytes: int = Field(64 * MiB, ge=1024)
    #: A request whose timestamp is further than this from the receiver's clock is stale.
    max_skew_s: int = Field(300, ge=1)
    #: Uploads processed at once; beyond it the receiver answers 503 with Retry-After.
    max_inflight_uploads: int = Field(16, ge=1)
    #: Uploads of one device at once, from its authenticated headers to the answer.
    max_inflight_per_device: int = Field(2, ge=1)
    #: A request body must arrive within this; a slower one is cut with 408.
    body_timeout_s: float = Field(30, gt=0, le=3600)
    #: v1-signed bodies read at once before their signature can be checked (beyond: 503).
    max_unverified_bodies: int = Field(32, ge=1)
    #: Accept signature version 1 (older devices; its body is read before it is verified).
    accept_v1_signatures: bool = True
    #: Uploads per second one device may make (a token bucket), and its burst.
    device_uploads_per_s: float = Field(20, gt=0)
    device_upload_burst: int = Field(40, ge=1)
    retry_after_s: int = Field(2, ge=1)
    # -- bounds of what one upload may carry or create (see docs/security.md) -------------
    #: Decompressed bytes per byte sent, beyond the first 64 KiB (zip-bomb guard).
    max_decompression_ratio: int = Field(100, ge=2)
    #: Readings in one request, all its batches together.
    max_readings_per_request: int = Field(1_000_000, ge=1)
    #: Longest source or metric name, in characters.
    max_name_chars: int = Field(256, ge=16, le=4096)
    #: Series one request may create (beyond: 413, so the device sends fewer batches).
    max_new_series_per_request: int = Field(1000, ge=1)
    #: Series a device may have in all (beyond: 422 until an operator raises it).
    max_series_per_device: int = Field(10_000, ge=1)
    #: Readings stamped further ahead of the receiver's clock (plus ``max_skew_s``) are
    #: refused: a device whose clock is wrong would hide its real lag.
    max_future_s: int = Field(86_400, ge=0)
    #: Readings of an upload whose signed timestamp is further than this from the
    #: receiver's clock are stored with the ``CLOCK_SKEW`` flag (docs/health.md).  Only
    #: skews below ``max_skew_s`` get that far: beyond it an upload is refused as stale.
    clock_flag_s: float = Field(60, gt=0, allow_inf_nan=False)
    #: The alert rules and webhooks (a YAML file, docs/alerts.md); no alerts without it.
    alerts_file: str | None = None
    #: Bearer token for the read API (the dashboard replaces this with operator sessions).
    api_token: SecretStr | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: File (mode 0600) with the master key lines that seal device secrets at rest;
    #: ``edgepipe-cloud master-key generate --out FILE`` makes one.
    master_key_file: str | None = None
    #: Or the master key lines themselves (``EDGEPIPE_CLOUD_MASTER_KEY``).
    master_key: SecretStr | None = None
    #: File (mode 0600) with the fleet's Ed25519 signing key lines (the last signs new
    #: bundles); ``edgepipe-cloud signing-key generate --out FILE`` makes one.
    signing_key_file: str | None = None
    #: Or the signing key lines themselves (``EDGEPIPE_CLOUD_SIGNING_KEY``).
    signing_key: SecretStr | None = None
    #: How often active rollouts are evaluated (also at every check-in of their devices).
    rollout_evaluate_s: float = Field(5, gt=0, le=3600)
    #: The fleet id every bundle of this receiver names (devices check it).
    fleet: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    @model_validator(mode="after")
    def _clock_flag_below_skew(self) -> Settings:
        if self.clock_flag_s >= self.max_skew_s:
            raise ValueError(
                f"clock_flag_s ({self.clock_flag_s:g}) must be less than max_skew_s "
                f"({self.max_skew_s}): an upload skewed further is refused, never flagged"
            )
        return self

    @model_validator(mode="after")
    def _one_master_key(self) -> Settings:
        if self.master_key_file is not None and self.master_key is not None:
            raise ValueError("give master_key_file or master_key, not both")
        if self.signing_key_file is not None and self.signing_key is not None:
            raise ValueError("give signing_key_file or signing_key, not both")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``EDGEPIPE_CLOUD_*`` variables; ``overrides`` that are not None win.
        ``EDGEPIPE_CLOUD_MAX_BODY_MB`` (or ``max_body_mb=``) sets ``max_body_bytes`` in MiB."""
        env = os.environ if environ is None else environ
        values = cls._from_environment(env)
        mb = overrides.pop("max_body_mb", None) or env.get(ENV_PREFIX + "MAX_BODY_MB")
        if mb:
            values["max_body_bytes"] = int(float(mb) * MiB)
        given = {k: v for k, v in overrides.items() if v is not None}
        if "master_key_file" in given or "master_key" in given:
            # A key named on the command line replaces one from the environment.
            values.pop("master_key_file", None)
            values.pop("master_key", None)
        if "signing_key_file" in given:
            values.pop("signing_key", None)
        values.update(given)
        return cls(**values)


class DashboardSettings(_EnvModel):
    """Dashboard knobs; each also comes from ``EDGEPIPE_CLOUD_<FIELD>``."""

    #: A device is shown offline when its last upload is older than this.
    offline_after_s: float = Field(300, gt=0)
    #: How often open pages fetch fresh data.
    refresh_s: float = Field(5, gt=0)
    session_ttl_s: int = Field(12 * 3600, ge=60)
    #: Secure cookies: None = when the request came over TLS; true behind a TLS proxy.
    secure_cookies: bool | None = None
    login_max_failures: int = Field(5, ge=1)
    login_window_s: int = Field(300, ge=1)
    #: Threads that verify passwords (argon2, ~0.1 s of one core each), apart from the
    #: uploads' threads; one leaves the other cores to uploads during a sign-in flood.
    login_check_workers: int = Field(1, ge=1, le=16)
    #: Password checks that may wait for a thread; beyond, a login is answered 429.
    login_check_queue: int = Field(8, ge=0, le=1024)
    # -- fleet badges (docs/health.md): the states an operator must act on --------------
    #: Store fill (used bytes over the quota) above which a device gets ``store_full``.
    badge_store_fill: float = Field(0.8, gt=0, le=1)
    #: Clock skew (device against receiver, either way) beyond which: ``clock_skew``.
    badge_clock_skew_s: float = Field(30, gt=0)
    #: ``silent``: nothing heard for this many times the device's usual reporting
    #: interval (the median spacing of its health snapshots) ...
    badge_silent_factor: float = Field(3, ge=1, le=1000)
    #: ... and at least this long.
    badge_silent_min_s: float = Field(120, gt=0)
    #: The fleet's badges look back this far (``session_lost``: sessions lost increased).
    badge_window_s: float = Field(3600, ge=60, le=31 * 86400)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DashboardSettings:
        return cls(**cls._from_environment(environ))
