"""Wasm modules, in two folders that do not import each other.

* fetch/    OCI/HTTP fetch, verification, cache, hand-off to Envoy (`sidecar wasm pull|push|ls|gc`)
* host/     a local proxy-wasm host on wasmtime (`sidecar wasm run`, `sidecar.wasm.host.Plugin`)
"""
