"""The secrets and files a ``pipeline.yaml`` names, resolved as ``run`` resolves them.

The one place where a secret that cannot be had (an unset environment variable, a
missing or too permissive file, a keyring that does not parse, a device secret that is
not the receiver's hex) becomes a :class:`ConfigError` at the YAML node that names it::

    pipeline.yaml:63:8: store.key: cannot read store key file nokey.key: No such file ...

:func:`check_secrets` is what ``edgepipe validate`` and ``edgepipe run`` refuse a config
for before anything is opened: it reads each secret and opens each named file for reading,
and connects to nothing and writes nothing.  :func:`store_keyring` and
:func:`device_secret` are what the composition root builds from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core._errors import ConfigError, KeyError_
from protocol._keys import Keyring

from ._models import PipelineConfig, Secret

__all__ = [
    "DEVICE_SECRET_MIN_BYTES",
    "check_secrets",
    "device_secret",
    "device_secret_bytes",
    "located",
    "store_keyring",
]

#: the receiver issues 32 random bytes as hex (``edgepipe-cloud devices add``); the sync
#: transport refuses a key shorter than this
DEVICE_SECRET_MIN_BYTES = 16

_NO_DEVICE_SECRET = (
    "not set, and sync is enabled (the default): give the secret `edgepipe-cloud devices "
    "add NAME` printed (literal, {file: PATH} or {env: NAME}), or set sync.enabled: false"
)


def located(
    cfg: PipelineConfig, at: tuple[Any, ...], message: str, *, node: tuple[Any, ...] = ()
) -> ConfigError:
    """``message`` about the key at ``at`` (e.g. ``("store", "key")``) as a
    :class:`ConfigError` at that node in the config file (or at ``node`` below it),
    ``file:line:col: store.key: ...``; at the closest enclosing node when the key is not in
    the file (a default)."""
    locs = cfg.locations
    probe = (*at, *node)
    pos = locs.get(probe)
    while pos is None and probe:
        probe = probe[:-1]
        pos = locs.get(probe)
    line, col = pos or (1, 1)
    dotted = ".".join(str(p) for p in at)
    return ConfigError(f"{dotted}: {message}", path=cfg.source, line=line, col=col)


def _source(secret: Secret) -> tuple[Any, ...]:
    """The part of a secret's node that names where it comes from (``file:``/``env:``)."""
    for part in ("file", "env"):
        if getattr(secret, part) is not None:
            return (part,)
    return ()


def _get(cfg: PipelineConfig, at: tuple[Any, ...], secret: Secret) -> str:
    try:
        return secret.get()
    except LookupError as e:
        raise located(cfg, at, str(e), node=_source(secret)) from None


def store_keyring(cfg: PipelineConfig) -> Keyring:
    """The store keyring ``store.key`` names, with the permission rules of
    :func:`protocol._keys.read_key_file`; a located :class:`ConfigError` when it cannot be
    had."""
    secret = cfg.store.key
    if secret is None:
        raise located(
            cfg,
            ("store", "key"),
            "is required (a keyring file, env var or secret; `edgepipe keys generate -o "
            "store.key` makes one)",
        )
    try:
        return Keyring.from_secret(secret)
    except (KeyError_, LookupError) as e:
        raise located(cfg, ("store", "key"), str(e), node=_source(secret)) from None


def device_secret(cfg: PipelineConfig) -> str:
    """``sync.device_secret``, resolved and in the receiver's hex format (whether or not
    sync is enabled: the caller decides that); a located :class:`ConfigError` otherwise."""
    secret = cfg.sync.device_secret
    at = ("sync", "device_secret")
    if secret is None:
        raise located(cfg, at, _NO_DEVICE_SECRET)
    text = _get(cfg, at, secret)
    try:
        device_secret_bytes(text)
    except ValueError as e:
        raise located(cfg, at, f"{e} ({secret.describe()})") from None
    return text


def device_secret_bytes(text: str) -> bytes:
    """A device secret as ``edgepipe-cloud devices add`` prints it (hex) -> the key bytes;
    ``ValueError`` (without the value) when it is not one."""
    if not text.strip():
        raise ValueError("is empty")
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(
            "is not the hex string the receiver issued (edgepipe-cloud devices add NAME)"
        ) from None
    if len(key) < DEVICE_SECRET_MIN_BYTES:
        raise ValueError(
            f"is too short ({len(key)} bytes; the receiver issues 32, at least "
            f"{DEVICE_SECRET_MIN_BYTES} are needed)"
        )
    return key


def _readable(cfg: PipelineConfig, at: tuple[Any, ...], path: Path, what: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise located(cfg, at, f"cannot read {what} {path}: {e.strerror}") from None


def check_secrets(cfg: PipelineConfig) -> None:
    """Every secret and file ``cfg`` names, resolved the way ``run`` resolves it: the store
    keyring; ``sync.device_secret`` and ``sync.ca_file`` when sync is enabled; the broker
    password and TLS files.  Reads, never writes or connects; raises one
    :class:`ConfigError` listing every problem in file order."""
    problems: list[ConfigError] = []

    def check(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except ConfigError as e:
            problems.append(e)

    check(store_keyring, cfg)
    broker = cfg.broker
    if broker.password is not None:
        check(_get, cfg, ("broker", "password"), broker.password)
    if broker.tls is not None:
        for name in ("ca_file", "cert_file", "key_file"):
            p = getattr(broker.tls, name)
            if p is not None:
                # the MQTT client opens them as given (relative to the working directory)
                check(_readable, cfg, ("broker", "tls", name), Path(p), f"broker.tls.{name}")
    if cfg.sync.enabled:
        check(device_secret, cfg)
        if cfg.sync.ca_file is not None:
            ca = cfg.resolve(Path(cfg.sync.ca_file))
            check(_readable, cfg, ("sync", "ca_file"), ca, "sync.ca_file")
    if not problems:
        return
    problems.sort(key=lambda e: (e.line or 0, e.col or 0))
    first = problems[0]
    text = first.message + "".join(f"\n{e}" for e in problems[1:])
    raise ConfigError(text, path=first.path, line=first.line, col=first.col)
