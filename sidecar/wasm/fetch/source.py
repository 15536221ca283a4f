"""The fetcher's entry for the translator: an EnvoyExtensionPolicy wasm `code` block in, Envoy's
`AsyncDataSource` (as a plain dict) out, after fetching, verifying and caching the module.

    code = fetch_code({"type": "HTTP", "http": {"url": "http://127.0.0.1:8000/filter.wasm"}})
    # {"local": {"filename": "~/.cache/sidecar/wasm/modules/<sha256>.wasm"}}

    code = envoy_code(                      # with your own fetcher and hand-off
        {"type": "Image", "image": {"url": "ghcr.io/acme/filter:v1", "pullSecretRef": {"name": "pull"}}},
        fetcher,
        LocalHandoff(),                     # or HttpHandoff(server, cluster="wasm_cluster")
        pull_secrets={"pull": secret_manifest_dict},
    )
    # {"local": {"filename": "/var/lib/sidecar/wasm/modules/<sha256>.wasm"}}

`sidecar.translate` calls `fetch_code` (through `sidecar.translate.wasmsource.fetch_module`, which
turns a WasmError into a ConfigError naming the resource); nothing here knows about the translator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sidecar.wasm.fetch.auth import DockerConfig, pull_secret_from_manifest
from sidecar.wasm.fetch.cache import ModuleCache, default_cache_dir
from sidecar.wasm.fetch.errors import BadReferenceError
from sidecar.wasm.fetch.fetcher import ModuleFetcher, PullResult
from sidecar.wasm.fetch.handoff import HttpHandoff, LocalHandoff, data_source
from sidecar.wasm.fetch.transfer import FetchOptions

__all__ = ["LOOPBACK_HOSTS", "HttpHandoff", "LocalHandoff", "envoy_code", "fetch_code", "fetch_source"]

# Plain HTTP (for URLs and registries) is allowed for these hosts, which is what a local `sidecar render`
# or `sidecar up` talks to, and for the hosts the caller lists.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def fetch_code(
    code: Mapping[str, Any],
    cache_dir: Path | None = None,
    *,
    pull_secrets: Mapping[str, Mapping[str, Any]] | None = None,
    insecure_hosts: Iterable[str] = (),
) -> dict[str, Any]:
    """Fetch and verify the module a `code` block names into the cache at `cache_dir` (default
    `default_cache_dir()`); the Envoy `code` AsyncDataSource naming it as a local file.

    Raises a WasmError (a FetchError or CacheError) when the module cannot be had.
    """
    options = FetchOptions(insecure_hosts=frozenset((*LOOPBACK_HOSTS, *insecure_hosts)))
    fetcher = ModuleFetcher(ModuleCache(cache_dir or default_cache_dir()), options)
    return envoy_code(code, fetcher, LocalHandoff(), pull_secrets)


def fetch_source(
    spec: Mapping[str, Any],
    fetcher: ModuleFetcher,
    pull_secrets: Mapping[str, Mapping[str, Any]] | None = None,
) -> PullResult:
    """Fetch (or find in the cache) the module an EG `code` block names."""
    if not isinstance(spec, Mapping):
        raise BadReferenceError("wasm code: expected an object with 'type'")
    kind = spec.get("type")
    policy = spec.get("pullPolicy")
    if policy is not None and not isinstance(policy, str):
        raise BadReferenceError(f"wasm code.pullPolicy: expected a string, got {policy!r}")
    if kind == "Image":
        image = _section(spec, "image")
        return fetcher.pull_image(
            _url(image, "image"),
            sha256=_sha(image, "image"),
            policy=policy,
            pull_secret=_secret(image, pull_secrets or {}),
        )
    if kind == "HTTP":
        http = _section(spec, "http")
        return fetcher.pull_http(_url(http, "http"), sha256=_sha(http, "http"), policy=policy)
    raise BadReferenceError(f"wasm code.type {kind!r}: expected 'Image' or 'HTTP' (ConfigMap is not supported)")


def envoy_code(
    spec: Mapping[str, Any],
    fetcher: ModuleFetcher,
    handoff: LocalHandoff | HttpHandoff,
    pull_secrets: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """EG `code` block -> Envoy `code` (AsyncDataSource) dict; fetches and verifies first."""
    return data_source(fetch_source(spec, fetcher, pull_secrets).module, handoff)


def _section(spec: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = spec.get(name)
    if not isinstance(section, Mapping):
        raise BadReferenceError(f"wasm code.{name}: missing (type is {spec.get('type')!r})")
    return section


def _url(section: Mapping[str, Any], name: str) -> str:
    url = section.get("url")
    if not isinstance(url, str) or not url:
        raise BadReferenceError(f"wasm code.{name}.url: expected a non-empty string")
    return url


def _sha(section: Mapping[str, Any], name: str) -> str | None:
    sha = section.get("sha256")
    if sha is not None and not isinstance(sha, str):
        raise BadReferenceError(f"wasm code.{name}.sha256: expected a string")
    return sha or None


def _secret(image: Mapping[str, Any], pull_secrets: Mapping[str, Mapping[str, Any]]) -> DockerConfig | None:
    ref = image.get("pullSecretRef")
    if ref is None:
        return None
    name = ref.get("name") if isinstance(ref, Mapping) else None
    if not isinstance(name, str) or not name:
        raise BadReferenceError("wasm code.image.pullSecretRef.name: expected a Secret name")
    if name not in pull_secrets:
        raise BadReferenceError(f"wasm code.image.pullSecretRef: Secret {name!r} was not provided")
    return pull_secret_from_manifest(pull_secrets[name], f"Secret {name!r}")
