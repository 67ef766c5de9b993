"""The filter ABI v1 as data (see filters/ABI.md): the exports a module must or may have,
the host functions it may import, and the ``ep_init`` config text format."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol._abi import ABI_VERSION, IMPORTS, OPTIONAL_EXPORTS, REQUIRED_EXPORTS

__all__ = ["ABI_VERSION", "IMPORTS", "OPTIONAL_EXPORTS", "REQUIRED_EXPORTS", "flatten_config"]

# The tables are shared with the cloud, which checks a module's imports and exports before it
# signs a bundle naming it (protocol._abi); the full check with wasmtime is in ._module.


def flatten_config(config: Mapping[str, Any]) -> str:
    """The YAML ``config:`` mapping as ``key=value`` lines (ABI v1 config text)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if v is None:
            return ""
        if isinstance(v, float):
            return repr(v)
        return str(v)

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        if isinstance(value, list | tuple):
            text = ",".join(scalar(v) for v in value)
        else:
            text = scalar(value)
        if "\n" in text or "\n" in prefix or "=" in prefix:
            raise ValueError(f"config key {prefix!r}: keys may not contain '=' or newlines")
        lines.append(f"{prefix}={text}")

    walk("", dict(config))
    return "".join(line + "\n" for line in lines)
