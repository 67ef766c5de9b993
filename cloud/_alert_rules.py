"""The operator's alert rules file (docs/alerts.md): which device states raise an alert, and
the webhooks each firing and resolve goes to.

Pydantic models with ``extra="forbid"``; :func:`load_alert_rules` reports every problem at
its line and column in the file (``alerts.yaml:7:5: rules.1.store_full.above: ...``) as a
:class:`core._errors.ConfigError`, and reads the secrets the webhooks name (an unset
variable or an unreadable file is located the same way), so a receiver never starts with a
rule it cannot evaluate or a webhook it cannot sign.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core._errors import ConfigError
from core._located import load_yaml_located, locate_validation_error

__all__ = [
    "AlertRules",
    "Rule",
    "Webhook",
    "load_alert_rules",
    "parse_alert_rules",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Severity = Literal["critical", "warning", "info"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _RuleBase(_Model):
    #: Unique; the alert's ``alertname`` and the first part of its key.
    name: str = Field(pattern=_NAME)
    #: Device names (shell globs: ``aq-*``) the rule watches.
    devices: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["*"], min_length=1, max_length=100
    )
    severity: Severity = "warning"


class StoreFullRule(_RuleBase):
    """The device's store above ``above`` (a fraction) of its quota."""

    kind: Literal["store_full"]
    above: float = Field(0.8, gt=0, lt=1)


class BreakerOpenRule(_RuleBase):
    """A stage's circuit breaker open (one alert per stage)."""

    kind: Literal["breaker_open"]


class SessionLostRule(_RuleBase):
    """The MQTT session was lost (the device's ``sessions_lost`` went up) within the last
    ``within_min`` minutes."""

    kind: Literal["session_lost"]
    within_min: float = Field(60, gt=0, le=7 * 24 * 60)


class ClockSkewRule(_RuleBase):
    """The device's clock more than ``above_s`` seconds off the receiver's."""

    kind: Literal["clock_skew"]
    above_s: float = Field(30, gt=0)


class SilentRule(_RuleBase):
    """No upload from the device for ``for_min`` minutes (by the receiver's clock)."""

    kind: Literal["silent"]
    for_min: float = Field(10, gt=0, le=365 * 24 * 60)


class NoReadingsRule(_RuleBase):
    """No reading of ``metric`` (from ``source``, if given) newer than ``for_min`` minutes."""

    kind: Literal["no_readings"]
    metric: str = Field(min_length=1, max_length=256)
    source: str | None = Field(None, min_length=1, max_length=256)
    for_min: float = Field(gt=0, le=365 * 24 * 60)


Rule = Annotated[
    StoreFullRule | BreakerOpenRule | SessionLostRule | ClockSkewRule | SilentRule | NoReadingsRule,
    Field(discriminator="kind"),
]


class Webhook(_Model):
    """Where firings and resolves are POSTed, in one of the documented bodies."""

    url: str = Field(min_length=8, max_length=2048)
    #: ``alertmanager`` (Alertmanager's webhook payload), ``slack`` (an incoming-webhook
    #: message) or ``pagerduty`` (an Events API v2 event).
    format: Literal["alertmanager", "slack", "pagerduty"] = "alertmanager"
    #: Only these rules (by name) go to this webhook; all when omitted.
    rules: list[str] | None = None
    #: HMAC-SHA256 key of the ``X-Edgepipe-Alert-Signature`` header: a file (its first
    #: line) or an environment variable.  No signature when neither is given.
    secret_file: str | None = None
    secret_env: str | None = None
    #: PagerDuty's integration key, from this environment variable (``pagerduty`` only).
    routing_key_env: str | None = None
    timeout_s: float = Field(10, gt=0, le=120)
    #: Notifications waiting while the webhook is down; beyond, the oldest is dropped.
    queue: int = Field(1000, ge=1, le=100_000)
    #: Retry delay after a failure: exponential with jitter between these.
    retry_min_s: float = Field(1, gt=0, le=3600)
    retry_max_s: float = Field(300, gt=0, le=86_400)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        if any(c <= " " or c == "\x7f" for c in v):
            raise ValueError("must not contain spaces or control characters")
        u = urlsplit(v)
        try:
            u.port  # noqa: B018 - urlsplit checks the port only when it is read
        except ValueError as e:
            raise ValueError(f"has a bad port: {e}") from None
        if not u.hostname:
            raise ValueError("names no host")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Webhook:
        if self.secret_file is not None and self.secret_env is not None:
            raise ValueError("give secret_file or secret_env, not both")
        if (self.format == "pagerduty") != (self.routing_key_env is not None):
            raise ValueError("routing_key_env is required with format pagerduty, and only there")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s must not be below retry_min_s")
        return self


class AlertRules(_Model):
    """The whole file."""

    #: How often every rule is evaluated (also whenever an upload arrives, for its device).
    evaluate_every_s: float = Field(30, ge=0.05, le=3600)
    #: The dashboard's address, for the links in the notifications.
    dashboard_url: str | None = Field(None, max_length=2048)
    rules: list[Rule] = Field(default_factory=list, max_length=1000)
    webhooks: list[Webhook] = Field(default_factory=list, max_length=20)

    @model_validator(mode="after")
    def _names(self) -> AlertRules:
        seen: set[str] = set()
        for r in self.rules:
            if r.name in seen:
                raise ValueError(f"two rules are named {r.name!r}")
            seen.add(r.name)
        for i, w in enumerate(self.webhooks):
            unknown = sorted(set(w.rules or ()) - seen)
            if unknown:
                raise ValueError(f"webhooks.{i}.rules names no rule {', '.join(unknown)}")
        return self


def parse_alert_rules(data: Any) -> AlertRules:
    """The rules from already parsed data (a mapping); raises :class:`ValidationError`."""
    return AlertRules.model_validate({} if data is None else data)


def load_alert_rules(
    path: str | os.PathLike[str], environ: dict[str, str] | None = None
) -> tuple[AlertRules, dict[int, tuple[bytes | None, str | None]]]:
    """Read and check a rules file.  Returns the rules and, per webhook index, its HMAC key
    and PagerDuty routing key (read now).  Raises :class:`ConfigError`, located."""
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read the alert rules: {e.strerror}", path=shown) from None
    except UnicodeDecodeError:
        raise ConfigError("the alert rules are not UTF-8 text", path=shown) from None
    data, locs = load_yaml_located(text, shown)
    if data is not None and not isinstance(data, dict):
        raise ConfigError("the alert rules must be a mapping", path=shown, line=1, col=1)
    try:
        rules = parse_alert_rules(data)
    except ValidationError as e:
        raise locate_validation_error(e, locs, shown) from None
    env = os.environ if environ is None else environ
    secrets: dict[int, tuple[bytes | None, str | None]] = {}
    base = Path(path).resolve().parent
    for i, w in enumerate(rules.webhooks):

        def where(key: str, i: int = i) -> dict[str, Any]:
            line, col = locs.get(("webhooks", i, key), locs.get(("webhooks", i), (1, 1)))
            return {"path": shown, "line": line, "col": col}

        key: bytes | None = None
        if w.secret_file is not None:
            f = Path(w.secret_file)
            f = f if f.is_absolute() else base / f
            try:
                first = f.read_text(encoding="utf-8").strip().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                why = getattr(e, "strerror", None) or "not UTF-8 text"
                raise ConfigError(
                    f"webhooks.{i}.secret_file: cannot read {f}: {why}", **where("secret_file")
                ) from None
            if not first or not first[0]:
                raise ConfigError(f"webhooks.{i}.secret_file: {f} is empty", **where("secret_file"))
            key = first[0].encode()
        elif w.secret_env is not None:
            value = env.get(w.secret_env, "")
            if not value:
                raise ConfigError(
                    f"webhooks.{i}.secret_env: ${w.secret_env} is not set", **where("secret_env")
                )
            key = value.encode()
        routing: str | None = None
        if w.routing_key_env is not None:
            routing = env.get(w.routing_key_env, "")
            if not routing:
                raise ConfigError(
                    f"webhooks.{i}.routing_key_env: ${w.routing_key_env} is not set",
                    **where("routing_key_env"),
                )
        secrets[i] = (key, routing)
    return rules, secrets
