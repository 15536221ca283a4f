"""The translator's entry points and its one pipeline: files -> resources -> validated -> Envoy bootstrap.

`render_bootstrap(paths)` loads the resources (resources.py), `translate` validates them (schema.py, then
rules.py, which resolves every reference through refs.py) and `build_bootstrap_from_resources` runs the
builders, each calling only the ones below it: Gateways -> listeners (gateway.py) -> HTTPRoutes -> routes
(routes.py) -> the policies in force (policies.py) -> clusters (backends.py). The listeners and the
clusters they collected become the bootstrap; `dump_yaml` writes it deterministically.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import yaml

from sidecar.errors import ConfigError
from sidecar.translate.gateway import build_listeners
from sidecar.translate.messages import finish_per_filter_configs
from sidecar.translate.options import RenderOptions
from sidecar.translate.regex import ENVOY_RUNTIME
from sidecar.translate.resources import ResourceSet, load_resources
from sidecar.translate.rules import validate

__all__ = ["build_bootstrap_from_resources", "dump_documents", "dump_yaml", "render_bootstrap", "translate"]


def translate(resources: ResourceSet, options: RenderOptions | None = None) -> dict[str, Any]:
    """Validate, then build the bootstrap. Raises ConfigError naming file, resource and field."""
    validate(resources)
    if not resources.of("Gateway"):
        raise ConfigError("no Gateway in the input files (need at least one, with listeners)")
    return build_bootstrap_from_resources(resources, options or RenderOptions())


def build_bootstrap_from_resources(resources: ResourceSet, options: RenderOptions) -> dict[str, Any]:
    """The Envoy bootstrap (static resources) for validated `resources`, as a plain dict."""
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap, BootstrapStaticResources

    clusters: dict[str, Any] = {}
    listeners = build_listeners(resources, options, clusters)
    static = BootstrapStaticResources(listeners=listeners, clusters=[clusters[name] for name in sorted(clusters)])
    # The proto field names as they are: Casing.SNAKE re-splits digits (consecutive_5xx -> consecutive_5_xx),
    # which Envoy refuses as an unknown field.
    as_dict = Bootstrap(static_resources=static).to_dict(casing=_proto_field_name)  # type: ignore[arg-type]
    result: dict[str, Any] = finish_per_filter_configs(as_dict)
    # EG's runtime layer: route regexes of any RE2 program size load (Envoy refuses past 100 without it).
    result["layered_runtime"] = copy.deepcopy(ENVOY_RUNTIME)
    return result


def _proto_field_name(name: str) -> str:
    return name


def render_bootstrap(paths: Sequence[str | os.PathLike[str]], options: RenderOptions | None = None) -> dict[str, Any]:
    return translate(load_resources(paths), options)


def _sorted(value: Any) -> Any:
    """Mapping keys in sorted order (lists keep theirs: their order is meaning), for stable output."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(_sorted(data), sort_keys=False, default_flow_style=False, width=120)


def dump_documents(docs: Sequence[Any]) -> str:
    """Several documents as one multi-document YAML stream, keys sorted."""
    return "---\n".join(dump_yaml(doc) for doc in docs)
