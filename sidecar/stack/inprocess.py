"""The in-process backend's Envoy config: the sidecar's bootstrap with the ext_proc filter swapped for the
dynamic-module filter that runs the same chains inside Envoy (`sidecar envoy-config --in-process`, `sidecar up
--in-process`, the tests and the benchmark).

The bootstrap is built once, by the translator, for the ext_proc path; this module rewrites the plain dict.
One chain for every route: one filter. Several: one filter per chain, and each route turns off the filters of
the chains it does not use (Envoy's `FilterConfig`), so a route runs exactly its chain, as the ext_proc path's
per-route chain metadata does. A request no route matches runs every chain's filter (Envoy then answers 404);
the ext_proc path runs only the default chain there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.chains import Registry
from sidecar.config import DEFAULT_CHAIN, SidecarConfig
from sidecar.errors import ConfigError

__all__ = ["hook_deadline_ms", "inprocess_bootstrap", "use_inprocess_filter", "write_env_file"]

_EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
_SIDECAR_CLUSTER = "envoy-sidecar"
_FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
_HCM = "envoy.filters.network.http_connection_manager"


def hook_deadline_ms(config: SidecarConfig) -> int:
    """The deadline of one hook inside Envoy: the config's `message_timeout`, the ext_proc path's deadline for
    one message, so a slow plugin fails at the same time on both backends."""
    seconds = config.message_timeout
    if not 0.001 <= seconds <= 3600:  # NaN fails this too
        raise ConfigError(f"--message-timeout / message_timeout: expected seconds from 0.001 to 3600, got {seconds}")
    return round(seconds * 1000)


def inprocess_bootstrap(
    registry: Registry, config: SidecarConfig, config_path: Path, options: Any, *, hook_deadline: int | None = None
) -> dict[str, Any]:
    """The bootstrap `build_bootstrap(registry, config, options)` makes, running the chains in Envoy instead."""
    from sidecar.translate.bootstrap import build_bootstrap

    if options.failure_mode_allow:
        raise ConfigError(
            "--failure-mode-allow: there is no sidecar to be unreachable with --in-process; "
            "give a chain on_error: fail_open instead"
        )
    # The bridge's own refusal (a FULL_DUPLEX chain, attributes it cannot give), here in one line: inside Envoy
    # it would only be "Failed to initialize dynamic module", with the reason on Envoy's stderr.
    from sidecar.inprocess.bridge import check_chain

    deadline_ms = hook_deadline or hook_deadline_ms(config)  # checked before the translator sees the timeout
    bootstrap = build_bootstrap(registry, config, options)
    for name in use_inprocess_filter(bootstrap, config_path, deadline_ms=deadline_ms):
        check_chain(registry.chains[name], str(config_path))
    return bootstrap


def _route_chain(route: dict[str, Any]) -> str:
    """The chain a generated route picks through its ext_proc per-route metadata (default: the default chain)."""
    override = route.get("typed_per_filter_config", {}).get(_EXT_PROC_FILTER, {})
    for item in override.get("overrides", {}).get("grpc_initial_metadata", []):
        return str(item["value"])
    return DEFAULT_CHAIN


def use_inprocess_filter(bootstrap: dict[str, Any], config_path: Path, *, deadline_ms: int) -> set[str]:
    """Rewrite, in place, every HTTP connection manager's ext_proc filter into the in-process filter(s), and
    drop the sidecar's cluster. Returns the names of the chains the filters run."""
    from sidecar.inprocess.module import http_filter

    if not config_path.is_absolute():
        raise ConfigError(f"in-process config path must be absolute, got {str(config_path)!r}")
    resources = bootstrap["static_resources"]
    used: set[str] = set()
    for listener in resources.get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                if network_filter.get("name") == _HCM:
                    used |= _rewrite_hcm(network_filter["typed_config"], config_path, deadline_ms, http_filter)
    resources["clusters"] = [c for c in resources.get("clusters", []) if c.get("name") != _SIDECAR_CLUSTER]
    return used


def _rewrite_hcm(hcm: dict[str, Any], config_path: Path, deadline_ms: int, http_filter: Any) -> set[str]:
    filters: list[dict[str, Any]] = hcm["http_filters"]
    at = next((i for i, f in enumerate(filters) if f.get("name") == _EXT_PROC_FILTER), None)
    if at is None:
        return set()
    routes = [r for vhost in hcm["route_config"]["virtual_hosts"] for r in vhost.get("routes", [])]
    chains = {id(route): _route_chain(route) for route in routes}
    for route in routes:
        per_filter = route.get("typed_per_filter_config", {})
        per_filter.pop(_EXT_PROC_FILTER, None)
        if not per_filter:
            route.pop("typed_per_filter_config", None)
    names = sorted(set(chains.values())) or [DEFAULT_CHAIN]
    replacement = {name: http_filter(config_path, name, hook_deadline_ms=deadline_ms) for name in names}
    filters[at : at + 1] = replacement.values()
    if len(replacement) > 1:
        # Envoy turns a filter off for a route with an empty FilterConfig, but will not turn one on without
        # that filter's own per-route config: so every chain's filter is on, and each route turns off the others.
        off = {"@type": _FILTER_CONFIG_TYPE, "disabled": True}
        for route in routes:
            per_filter = route.setdefault("typed_per_filter_config", {})
            for name, entry in replacement.items():
                if name != chains[id(route)]:
                    per_filter[entry["name"]] = dict(off)
    return set(names)


def write_env_file(path: Path, environment: Mapping[str, str]) -> None:
    """`KEY=VALUE` lines (the env-file format of systemd and docker), written whole or not at all."""
    for key, value in environment.items():
        if "\n" in value or "\0" in value:
            raise ConfigError(f"--env-file: {key} holds a newline or NUL, which an env file cannot carry")
    text = "".join(f"{key}={value}\n" for key, value in environment.items())
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise ConfigError(f"--env-file {path}: cannot write there ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(f"--env-file {path}: cannot write it ({exc.strerror})") from None
