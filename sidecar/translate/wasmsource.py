"""The translator's one call into the Wasm fetcher: `fetch_module(code) -> Envoy AsyncDataSource dict`.

`code` is an EnvoyExtensionPolicy wasm `code` block (type Image or HTTP). Fetching, verifying
(EG's sha256 semantics), caching and the hand-off to Envoy as a local file are the fetcher's:
`sidecar.wasm.fetch.source.fetch_code`. Here its errors become ConfigErrors, which the translator
prefixes with the file, resource and field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sidecar.errors import ConfigError, WasmError

__all__ = ["fetch_module"]


def fetch_module(
    code: Mapping[str, Any],
    cache_dir: Path | None = None,
    *,
    pull_secrets: Mapping[str, Mapping[str, Any]] | None = None,
    insecure_hosts: Iterable[str] = (),
) -> dict[str, Any]:
    """Fetch and verify a module; the Envoy `code` AsyncDataSource as a dict."""
    from sidecar.wasm.fetch.source import fetch_code  # oras-py and requests only when a module is fetched

    try:
        return fetch_code(code, cache_dir, pull_secrets=pull_secrets, insecure_hosts=insecure_hosts)
    except WasmError as exc:
        raise ConfigError(str(exc)) from None
