"""Small helpers over envoy-data-plane messages shared by the translator modules.

envoy-data-plane takes ~0.5 s to import, so every module imports it inside functions; these helpers
keep that boilerplate in one place, with the fix-ups of the rendered dict where envoy-data-plane
cannot express what Envoy needs (`finish_per_filter_configs`).
"""

from __future__ import annotations

import datetime
import re
from typing import Any

__all__ = ["address", "enable_on_route", "finish_per_filter_configs", "pack", "parse_duration", "pipe_address"]

_DURATION_PART = re.compile(r"([0-9]+)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: str) -> datetime.timedelta:
    """A Gateway API duration (`1h30m`, `500ms`; already validated) as a timedelta."""
    seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(value))
    return datetime.timedelta(seconds=seconds)


def pack(message: Any) -> Any:
    from envoy_data_plane.google.protobuf import Any as AnyMessage

    return AnyMessage.pack(message)


def address(host: str, port: int) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress

    return Address(socket_address=SocketAddress(address=host, port_value=port))


def pipe_address(path: str) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import Address, Pipe

    return Address(pipe=Pipe(path=path))


def enable_on_route() -> Any:
    """What EG puts in a route's typed_per_filter_config to turn on a filter that is disabled by default."""
    from envoy_data_plane.envoy.config.route.v3 import FilterConfig

    return pack(FilterConfig())


_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
_RBAC_PER_ROUTE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"


_FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
_WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


def finish_per_filter_configs(value: Any) -> Any:
    """Fix up a rendered bootstrap dict where envoy-data-plane cannot say what Envoy needs.

    * per-route RBAC entries become the RBACPerRoute that wraps them;
    * a FilterConfig that only enables a filter gets `config: {}` (an empty Any, as EG writes it):
      without it Envoy refuses an "empty per filter configuration";
    * a Wasm plugin's `failure_policy: FAIL_OPEN` becomes EG's `fail_open: true`. Envoy treats them
      differently: with FAIL_OPEN the request on which the module fails gets a 503 and only later ones
      bypass it; with `fail_open` that request passes too (tests/translate/test_wasm_differential.py).
      The binding warns on building a message with the deprecated field, hence here, in the dict.
    """
    if isinstance(value, list):
        return [finish_per_filter_configs(v) for v in value]
    if not isinstance(value, dict):
        return value
    result = {k: finish_per_filter_configs(v) for k, v in value.items()}
    plugin = result.get("config")
    if result.get("@type") == _WASM_TYPE and isinstance(plugin, dict) and plugin.get("failure_policy") == "FAIL_OPEN":
        result["config"] = {**{k: v for k, v in plugin.items() if k != "failure_policy"}, "fail_open": True}
    per_filter = result.get("typed_per_filter_config")
    if isinstance(per_filter, dict):
        for name, entry in per_filter.items():
            if entry.get("@type") == _RBAC_TYPE:
                rules = {k: v for k, v in entry.items() if k != "@type"}
                per_filter[name] = {"@type": _RBAC_PER_ROUTE_TYPE, "rbac": rules}
            elif entry.get("@type") == _FILTER_CONFIG_TYPE and "config" not in entry:
                per_filter[name] = {**entry, "config": {}}
    return result
