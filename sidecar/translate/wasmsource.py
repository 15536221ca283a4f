"""The seam between the translator and the Wasm fetcher: `fetch_module(code) -> Envoy AsyncDataSource dict`.

`code` is an EnvoyExtensionPolicy wasm `code` block (type Image or HTTP). The module is fetched with
`sidecar.wasm` (OCI registries, private ones included, or HTTPS), verified with EG's sha256 semantics,
stored in the content-addressed cache and handed to Envoy as a local file. Fetch errors become
ConfigErrors, which the translator prefixes with the file, resource and field.

Plain HTTP (for URLs and registries) is allowed only for loopback hosts, which is what a local
`sidecar render` / `sidecar up` talks to, and for hosts listed in `insecure_hosts`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sidecar.errors import ConfigError, WasmError

__all__ = ["default_cache_dir", "fetch_module"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "envoy-sidecar" / "wasm"


def fetch_module(
    code: Mapping[str, Any],
    cache_dir: Path | None = None,
    *,
    pull_secrets: Mapping[str, Mapping[str, Any]] | None = None,
    insecure_hosts: Iterable[str] = (),
) -> dict[str, Any]:
    """Fetch and verify a module; the Envoy `code` AsyncDataSource as a dict."""
    from sidecar.wasm.cache import ModuleCache
    from sidecar.wasm.fetcher import ModuleFetcher
    from sidecar.wasm.source import LocalHandoff, envoy_code
    from sidecar.wasm.transfer import FetchOptions

    options = FetchOptions(insecure_hosts=frozenset((*_LOOPBACK, *insecure_hosts)))
    try:
        fetcher = ModuleFetcher(ModuleCache(cache_dir or default_cache_dir()), options)
        return envoy_code(code, fetcher, LocalHandoff(), pull_secrets)
    except WasmError as exc:
        raise ConfigError(str(exc)) from None
