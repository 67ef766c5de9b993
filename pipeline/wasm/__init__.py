"""The host's Wasm plumbing shared by the filter chain and ingest: the AOT cache of
compiled modules (:mod:`._aot`) and the wasmtime C API fast path (:mod:`._ffi`)."""
