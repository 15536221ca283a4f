"""Wasm modules, in two folders that do not import each other.

* fetch/    OCI/HTTP fetch, verification, cache, hand-off to Envoy (`sidecar wasm pull|push|ls|gc`)
* host/     a local proxy-wasm host on wasmtime (`sidecar wasm run`, `sidecar.wasm.host.Plugin`)

Both keep their files under one cache root (`cache_root()`): the fetcher's modules, index and locks,
and the host's compiled code in its own private `compiled/` directory, which `sidecar wasm gc` also
sweeps.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["COMPILED_DIR", "ENV_CACHE_DIR", "cache_root"]

#: The one cache root of every Wasm command: `sidecar wasm pull/ls/gc/run`, `sidecar render`, `sidecar up -f`.
ENV_CACHE_DIR = "SIDECAR_WASM_CACHE"
#: Under the root, beside the fetcher's modules: wasmtime's compiled code (`.cwasm`), private (0700).
COMPILED_DIR = "compiled"


def cache_root() -> Path:
    """`$SIDECAR_WASM_CACHE`, else `$XDG_CACHE_HOME/sidecar/wasm` (`~/.cache/sidecar/wasm`)."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sidecar" / "wasm"
