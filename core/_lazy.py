"""Names of a package that load on first use (PEP 562), so importing a package for one
light name does not import its heavy neighbours (wasmtime, paho, the sync worker)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``where`` maps each public name to the
    relative module that defines it (``{"Chain": "._chain"}``)."""

    def __getattr__(name: str) -> Any:
        mod = where.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(mod, package), name)

    return __getattr__
