"""Wasm modules: OCI/HTTP fetch, verification, cache, hand-off to Envoy, and a local proxy-wasm host."""
