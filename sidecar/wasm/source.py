"""The translator's entry point: an EnvoyExtensionPolicy wasm `code` block in, Envoy's
`AsyncDataSource` (as a plain dict) out, after fetching and verifying the module.

    code = envoy_code(
        {"type": "Image", "image": {"url": "ghcr.io/acme/filter:v1", "pullSecretRef": {"name": "pull"}}},
        fetcher,
        LocalHandoff(),                     # or HttpHandoff(server, cluster="wasm_cluster")
        pull_secrets={"pull": secret_manifest_dict},
    )
    # {"local": {"filename": "/var/lib/sidecar/wasm/modules/<sha256>.wasm"}}

The remote form mirrors EG's: `http_uri` with a 10 s timeout, the module's sha256, and a retry policy
of 10 retries with 1 s..30 s backoff.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from sidecar.wasm.auth import DockerConfig, pull_secret_from_manifest
from sidecar.wasm.fetcher import ModuleFetcher, PullResult
from sidecar.wasm.fetcherrors import BadReferenceError
from sidecar.wasm.server import ModuleServer

__all__ = ["HttpHandoff", "LocalHandoff", "envoy_code", "fetch_source"]


@dataclass(frozen=True)
class LocalHandoff:
    """Envoy reads the module from the shared volume. `envoy_cache_dir` is where Envoy's container
    mounts the cache root, if not at the same path as ours."""

    envoy_cache_dir: str | None = None


@dataclass(frozen=True)
class HttpHandoff:
    """Envoy fetches the module from `server` through its cluster `cluster`."""

    server: ModuleServer
    cluster: str
    timeout: str = "10s"
    num_retries: int = 10


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
    module = fetch_source(spec, fetcher, pull_secrets).module
    if isinstance(handoff, LocalHandoff):
        filename = str(module.path)
        if handoff.envoy_cache_dir is not None:
            filename = str(PurePosixPath(handoff.envoy_cache_dir) / "modules" / module.path.name)
        return {"local": {"filename": filename}}
    return {
        "remote": {
            "http_uri": {
                "uri": handoff.server.publish(module),
                "cluster": handoff.cluster,
                "timeout": handoff.timeout,
            },
            "sha256": module.sha256,
            "retry_policy": {
                "num_retries": handoff.num_retries,
                "retry_back_off": {"base_interval": "1s", "max_interval": "30s"},
            },
        }
    }


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
