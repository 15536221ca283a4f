"""HTTP filter order: EG's default ranks, then EnvoyProxy `filterOrder` moves.

Default: the filter types in EG's order (FILTER_NAMES), several instances of one type (one
per extProc/wasm entry) in their generation order, the router last. A `filterOrder` entry moves *every*
filter of type `name` right before the first filter of type `before`, or right after the last filter of
type `after`; entries apply in the order given. Moves relative to a type that is not present are no-ops
(EG does the same), and the router never moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["FILTER_ALIASES", "FILTER_NAMES", "ROUTER", "filter_type", "order_filters"]

# EG's HTTP filter names in its default order (EnvoyProxy filterOrder enum, same order as the ranks).
FILTER_NAMES = (
    "envoy.filters.http.custom_response",
    "envoy.filters.http.health_check",
    "envoy.filters.http.fault",
    "envoy.filters.http.cors",
    "envoy.filters.http.csrf",
    "envoy.filters.http.header_mutation",
    "envoy.filters.http.ext_authz",
    "envoy.filters.http.api_key_auth",
    "envoy.filters.http.basic_auth",
    "envoy.filters.http.oauth2",
    "envoy.filters.http.jwt_authn",
    "envoy.filters.http.stateful_session",
    "envoy.filters.http.buffer",
    "envoy.filters.http.lua",
    "envoy.filters.http.ext_proc",
    "envoy.filters.http.wasm",
    "envoy.filters.http.dynamic_modules",
    "envoy.filters.http.geoip",
    "envoy.filters.http.rbac",
    "envoy.filters.http.local_ratelimit",
    "envoy.filters.http.ratelimit",
    "envoy.filters.http.bandwidth_limit",
    "envoy.filters.http.grpc_web",
    "envoy.filters.http.grpc_stats",
    "envoy.filters.http.credential_injector",
    "envoy.filters.http.compressor",
    "envoy.filters.http.dynamic_forward_proxy",
)

# EG 1.1 called the basic auth filter `basic_authn` in filterOrder (its release post's example does);
# later EG versions say `basic_auth`, the Envoy name. Both are accepted; order_filters maps the old one.
FILTER_ALIASES = {"envoy.filters.http.basic_authn": "envoy.filters.http.basic_auth"}

ROUTER = "envoy.filters.http.router"


def filter_type(name: str) -> str:
    """`envoy.filters.http.ext_proc/envoyextensionpolicy/...` -> `envoy.filters.http.ext_proc`."""
    return name.partition("/")[0]


def _rank(name: str) -> int:
    kind = filter_type(name)
    return len(FILTER_NAMES) if kind == ROUTER else FILTER_NAMES.index(kind)


def order_filters(filters: Sequence[Any], moves: Sequence[dict[str, str]] = ()) -> list[Any]:
    """`filters` are HttpFilter messages (router included); returns them in EG order with `moves` applied."""
    ordered = sorted(filters, key=lambda f: _rank(f.name))  # stable: instances keep generation order
    router = [f for f in ordered if filter_type(f.name) == ROUTER]
    rest = [f for f in ordered if filter_type(f.name) != ROUTER]
    for move in moves:
        name = FILTER_ALIASES.get(move["name"], move["name"])
        moving = [f for f in rest if filter_type(f.name) == name]
        anchor = move.get("before") or move.get("after") or ""
        anchor_type = FILTER_ALIASES.get(anchor, anchor)
        anchors = [i for i, f in enumerate(rest) if filter_type(f.name) == anchor_type]
        if not moving or not anchors:
            continue
        remaining = [f for f in rest if filter_type(f.name) != name]
        anchors = [i for i, f in enumerate(remaining) if filter_type(f.name) == anchor_type]
        at = anchors[0] if "before" in move else anchors[-1] + 1
        rest = remaining[:at] + moving + remaining[at:]
    return rest + router
