"""Load ``pipeline.yaml`` and report errors at their YAML line and column."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from core._errors import ConfigError
from core._located import load_yaml_located, locate_validation_error

from ._models import PipelineConfig

__all__ = ["load_config", "load_yaml_located", "locate_validation_error", "read_text"]


def read_text(path: Path, what: str) -> str:
    """A UTF-8 file's text; :class:`ConfigError` naming ``what`` when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {what}: {e.strerror}", path=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text", path=str(path)) from None


def load_config(path: str | Path, text: str | None = None) -> PipelineConfig:
    """Read, parse and validate a pipeline.yaml; raise :class:`ConfigError` on any problem."""
    path = Path(path)
    shown = str(path)
    if text is None:
        text = read_text(path, "config")
    data, locs = load_yaml_located(text, shown)
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of sections", path=shown, line=1, col=1)
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise locate_validation_error(e, locs, shown) from None
    cfg._base_dir = path.resolve().parent
    cfg._source = shown
    cfg._locs = locs
    return cfg
