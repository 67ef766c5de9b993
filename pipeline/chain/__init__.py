"""The filter chain: sandboxed WebAssembly stages (ABI v1), their AOT cache, the chain with
its error policies and breakers, and where a chain comes from (file, watcher, deploy)."""
