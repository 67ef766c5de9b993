"""Receiver settings: a pydantic model (``extra="forbid"``), from arguments or the environment."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = ["ENV_PREFIX", "Settings"]

ENV_PREFIX = "EDGEPIPE_CLOUD_"
MiB = 1024 * 1024


class Settings(BaseModel):
    """Everything the receiver can be told.  Each field can also come from the environment as
    ``EDGEPIPE_CLOUD_<FIELD>`` (e.g. ``EDGEPIPE_CLOUD_API_TOKEN``, ``EDGEPIPE_CLOUD_DB``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    retry_after_s: int = Field(2, ge=1)
    #: Bearer token for the read API (the dashboard replaces this with operator sessions).
    api_token: SecretStr | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: File (mode 0600) with the master key lines that seal device secrets at rest;
    #: ``edgepipe-cloud master-key generate --out FILE`` makes one.
    master_key_file: str | None = None
    #: Or the master key lines themselves (``EDGEPIPE_CLOUD_MASTER_KEY``).
    master_key: SecretStr | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    @model_validator(mode="after")
    def _one_master_key(self) -> Settings:
        if self.master_key_file is not None and self.master_key is not None:
            raise ValueError("give master_key_file or master_key, not both")
        return self

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``EDGEPIPE_CLOUD_*`` variables; ``overrides`` that are not None win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw not in (None, ""):
                values[name] = raw
        mb = overrides.pop("max_body_mb", None) or env.get(ENV_PREFIX + "MAX_BODY_MB")
        if mb:
            values["max_body_bytes"] = int(float(mb) * MiB)
        given = {k: v for k, v in overrides.items() if v is not None}
        if "master_key_file" in given or "master_key" in given:
            # A key named on the command line replaces one from the environment.
            values.pop("master_key_file", None)
            values.pop("master_key", None)
        values.update(given)
        return cls(**values)
