"""The filter chain: sandboxed WebAssembly stages (ABI v1), their AOT cache, the chain with
its error policies and breakers, and where a chain comes from (file, watcher, deploy).

Names load on first use, so importing one (e.g. the chain file models for ``edgepipe
validate``) does not pull in wasmtime before it is needed.
"""

from __future__ import annotations

from core._lazy import lazy_names

__all__ = [
    "Chain",
    "ChainResult",
    "ChainSpec",
    "ChainWatcher",
    "load_chain_file",
]

_WHERE = {
    "load_chain_file": "._deploy",
    "Chain": "._chain",
    "ChainResult": "._chain",
    "ChainSpec": "._deploy",
    "ChainWatcher": "._deploy",
}


__getattr__ = lazy_names(__name__, _WHERE)
