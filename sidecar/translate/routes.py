"""HTTPRoutes -> Envoy routes and virtual hosts, for one HTTP connection manager (HCM) at a time.

For each route attached to a listener (refs.attached_routes), every rule becomes one Envoy route per
match and hostname served (route name `httproute/<ns>/<name>/rule/<r>/match/<m>/<host>`), in a virtual
host per hostname (`<hcm>/<hostname with dots as underscores>`). Routes in a virtual host are ordered by
Gateway API precedence: Exact, then regular expression, then prefix; longer paths first; then method
matches, then more header/query matches. A rule's backendRefs become one cluster
`httproute/<ns>/<name>/rule/<r>` (backends.py), shaped by the BackendTrafficPolicy in force; the
EnvoyExtensionPolicy and SecurityPolicy in force switch their filters on per route (policies.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sidecar.errors import ConfigError
from sidecar.translate.attachment import attached_policy
from sidecar.translate.backendrefs import rule_backends
from sidecar.translate.backends import H2C, build_cluster
from sidecar.translate.backendtls import upstream_tls
from sidecar.translate.messages import enable_on_route, pack, parse_duration
from sidecar.translate.options import RenderOptions
from sidecar.translate.policies import (
    RBAC,
    PolicyFilter,
    ext_proc_filters,
    load_balancing,
    rbac_filter,
    rbac_per_route,
    wasm_filters,
)
from sidecar.translate.refs import BackendTarget, endpoint_kinds, host_intersection
from sidecar.translate.resources import Resource, ResourceSet
from sidecar.translate.rules import dropped_rules, failed_rules

__all__ = ["INVALID_BACKEND_CLUSTER", "RouteBuilder", "RouteTable"]

log = logging.getLogger(__name__)

# EG's name for the share of unresolved backendRefs: no such cluster exists, so Envoy answers with the
# route's cluster_not_found_response_code (500) for exactly that share.
INVALID_BACKEND_CLUSTER = "invalid-backend-cluster"

_PATH_RANK = {"Exact": 0, "RegularExpression": 1, "PathPrefix": 2}
_REDIRECT_CODES = {
    301: "MOVED_PERMANENTLY",
    302: "FOUND",
    303: "SEE_OTHER",
    307: "TEMPORARY_REDIRECT",
    308: "PERMANENT_REDIRECT",
}


def _header_options(modifiers: list[dict[str, Any]]) -> tuple[list[Any], list[str]]:
    """Envoy's headers to add and to remove for a rule's header modifiers of one direction, as EG builds them:
    per filter its `add` entries, then `set`, then `remove`; a name already added or set (in any case) by an
    earlier entry is skipped, and so is a repeated removal."""
    from envoy_data_plane.envoy.config.core.v3 import (
        HeaderValue,
        HeaderValueOption,
        HeaderValueOptionHeaderAppendAction,
    )

    options: list[Any] = []
    seen: set[str] = set()
    removed: list[str] = []
    for modifier in modifiers:
        for verb, action in (("add", "APPEND_IF_EXISTS_OR_ADD"), ("set", "OVERWRITE_IF_EXISTS_OR_ADD")):
            for header in modifier.get(verb) or []:
                if header["name"].lower() in seen:
                    continue
                seen.add(header["name"].lower())
                options.append(
                    HeaderValueOption(
                        header=HeaderValue(key=header["name"], value=header["value"]),
                        append_action=HeaderValueOptionHeaderAppendAction[action],
                    )
                )
        for name in modifier.get("remove") or []:
            if name.lower() not in {r.lower() for r in removed}:
                removed.append(name)
    return options, removed


def _route_match(match: dict[str, Any]) -> Any:
    from envoy_data_plane.envoy.config.route.v3 import HeaderMatcher, QueryParameterMatcher, RouteMatch
    from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher, StringMatcher

    def string_match(spec: dict[str, Any]) -> Any:
        if spec.get("type", "Exact") == "RegularExpression":
            return StringMatcher(safe_regex=RegexMatcher(regex=spec["value"]))
        return StringMatcher(exact=spec["value"])

    path = match.get("path") or {}
    kind, value = path.get("type", "PathPrefix"), path.get("value", "/")
    if kind == "Exact":
        result = RouteMatch(path=value)
    elif kind == "RegularExpression":
        result = RouteMatch(safe_regex=RegexMatcher(regex=value))
    elif value.rstrip("/") == "":
        result = RouteMatch(prefix="/")
    else:
        # Gateway API prefixes match whole path segments: /foo matches /foo and /foo/bar, not /foobar.
        result = RouteMatch(path_separated_prefix=value.rstrip("/"))
    headers = [HeaderMatcher(name=h["name"], string_match=string_match(h)) for h in match.get("headers") or []]
    if match.get("method"):
        headers.append(HeaderMatcher(name=":method", string_match=StringMatcher(exact=match["method"])))
    result.headers = headers
    result.query_parameters = [
        QueryParameterMatcher(name=q["name"], string_match=string_match(q)) for q in match.get("queryParams") or []
    ]
    return result


def _precedence(match: dict[str, Any]) -> tuple[int, int, int, int]:
    path = match.get("path") or {}
    kind, value = path.get("type", "PathPrefix"), path.get("value", "/")
    headers = len(match.get("headers") or []) + len(match.get("queryParams") or [])
    return _PATH_RANK[kind], -len(value), 0 if match.get("method") else 1, -headers


def _redirect(spec: dict[str, Any]) -> Any:
    from envoy_data_plane.envoy.config.route.v3 import RedirectAction, RedirectActionRedirectResponseCode

    redirect = RedirectAction(
        response_code=RedirectActionRedirectResponseCode[_REDIRECT_CODES[spec.get("statusCode", 302)]]
    )
    if spec.get("scheme"):
        redirect.scheme_redirect = spec["scheme"]
    if spec.get("hostname"):
        redirect.host_redirect = spec["hostname"]
    if spec.get("port"):
        redirect.port_redirect = spec["port"]
    modifier = spec.get("path")
    if modifier and modifier["type"] == "ReplaceFullPath":
        redirect.path_redirect = modifier["replaceFullPath"]
    elif modifier:
        redirect.prefix_rewrite = modifier.get("replacePrefixMatch", "/") or "/"
    return redirect


@dataclass
class RouteTable:
    """The routes of one HCM being built: its virtual hosts, the HTTP filters its routes switch on, the routes."""

    name: str
    gateway: Resource
    listeners: list[dict[str, Any]]
    vhosts: dict[str, Any] = field(default_factory=dict)
    filters: dict[str, Any] = field(default_factory=dict)
    routes: list[tuple[tuple[Any, ...], str, Any]] = field(default_factory=list)
    # Some route sends a share to INVALID_BACKEND_CLUSTER: Envoy must not refuse the route config for naming a
    # cluster that does not exist (under RDS, as EG serves it, Envoy does not check; a static config must say so).
    names_missing_cluster: bool = False

    def virtual_hosts(self) -> list[Any]:
        """The virtual hosts, each with its routes in precedence order."""
        for _, host, envoy_route in sorted(self.routes, key=lambda item: item[0]):
            self.vhosts[host].routes.append(envoy_route)
        # Exact hostnames before wildcards before the catch-all, as Envoy prefers them anyway.
        return [self.vhosts[h] for h in sorted(self.vhosts, key=lambda h: (h == "*", h))]


def _needs_cluster_per_backend(resources: ResourceSet, targets: list[BackendTarget]) -> bool:
    """EG's NeedsClusterPerSetting, for what one Envoy cluster cannot hold: DNS names mixed with static
    addresses, backends with different upstream TLS, or HTTP/2-only backends beside HTTP/1 ones."""
    kinds = set().union(*(endpoint_kinds(t) for t in targets)) if targets else set()
    tls = {upstream_tls(resources, t) for t in targets}
    h2c = {t.resource.kind == "Backend" and H2C in (t.resource.spec.get("appProtocols") or []) for t in targets}
    return ("fqdn" in kinds and len(kinds) > 1) or len(tls) > 1 or len(h2c) > 1


class RouteBuilder:
    """Adds HTTPRoutes to RouteTables for one render. Rule clusters go into `clusters` (by name, shared
    with the other HCMs); each EnvoyExtensionPolicy's filters are built once, their clusters too."""

    def __init__(self, resources: ResourceSet, options: RenderOptions, clusters: dict[str, Any]) -> None:
        self.resources = resources
        self.options = options
        self.clusters = clusters
        self._policy_filters: dict[tuple[str, str], list[PolicyFilter]] = {}
        self._warned: set[str] = set()

    def add(self, table: RouteTable, route: Resource, listener: dict[str, Any]) -> None:
        """Add `route`'s rules, as attached to `listener`, to `table` (and their clusters to `clusters`)."""
        from envoy_data_plane.envoy.config.route.v3 import DirectResponseAction, Route, VirtualHost

        hosts = []
        for host in route.spec.get("hostnames") or [listener.get("hostname") or "*"]:
            served = host_intersection(host, listener.get("hostname"))
            if served is not None:
                hosts.append(served)
        rules = route.spec.get("rules") or [{}]
        dropped, failed = dropped_rules(route), failed_rules(route)
        outcomes = [(e, "is left out") for e in dropped.values()] + [(e, "answers 500") for e in failed.values()]
        for error, outcome in outcomes:
            if str(error) not in self._warned:  # a route attached to several listeners is built once per listener
                self._warned.add(str(error))
                log.warning("%s; the rule %s and the route keeps its other rules, as in EG", error, outcome)
        for r, rule in enumerate(rules):
            if r in dropped:
                continue
            # Policies attach per rule: one aimed at a rule (sectionName) applies to that rule only.
            per_filter = self._rule_filters(table, route, listener["name"], rule.get("name"))
            # A rule whose filters EG cannot apply answers 500, with none of them and no backend.
            action = None if r in failed else self._route_action(route, r, rule, table, listener["name"])
            filters = [] if r in failed else rule.get("filters") or []
            # EG numbers the one route of a rule without matches -1.
            for m, match in enumerate(rule.get("matches") or [{}]) if rule.get("matches") else [(-1, {})]:
                for host in hosts:
                    host_key = host.replace(".", "_").replace("*", "wildcard")
                    envoy_route = Route(
                        name=f"httproute/{route.namespace}/{route.name}/rule/{r}/match/{m}/{host_key}",
                        match=_route_match(match),
                        typed_per_filter_config=dict(per_filter),
                    )
                    redirect = next((f["requestRedirect"] for f in filters if f["type"] == "RequestRedirect"), None)
                    if redirect is not None:
                        envoy_route.redirect = _redirect(redirect)
                    elif action is not None:
                        envoy_route.route = action
                    else:
                        envoy_route.direct_response = DirectResponseAction(status=500)
                    requests = [f["requestHeaderModifier"] for f in filters if f["type"] == "RequestHeaderModifier"]
                    responses = [f["responseHeaderModifier"] for f in filters if f["type"] == "ResponseHeaderModifier"]
                    if requests:
                        added, removed = _header_options(requests)
                        envoy_route.request_headers_to_add, envoy_route.request_headers_to_remove = added, removed
                    if responses:
                        added, removed = _header_options(responses)
                        envoy_route.response_headers_to_add, envoy_route.response_headers_to_remove = added, removed
                    vhost_name = f"{table.name}/{host_key}"
                    if host not in table.vhosts:
                        table.vhosts[host] = VirtualHost(name=vhost_name, domains=[host])
                    table.routes.append(((host, *_precedence(match), len(table.routes)), host, envoy_route))

    def _rule_filters(self, table: RouteTable, route: Resource, listener: str, rule: str | None) -> dict[str, Any]:
        """The per-filter config switching on, for one rule, the filters of the policies in force there."""
        eep = attached_policy(self.resources, "EnvoyExtensionPolicy", route, table.gateway, listener, rule)
        security = attached_policy(self.resources, "SecurityPolicy", route, table.gateway, listener, rule)
        per_filter: dict[str, Any] = {}
        for pf in self._filters_of(eep) if eep else []:
            table.filters[pf.name] = pf.filter
            per_filter[pf.name] = enable_on_route()
        rbac = rbac_per_route(security) if security else None
        if rbac is not None:
            table.filters[RBAC] = rbac_filter()
            per_filter[RBAC] = pack(rbac)
        return per_filter

    def _filters_of(self, policy: Resource) -> list[PolicyFilter]:
        key = (policy.namespace, policy.name)
        if key not in self._policy_filters:
            found = [
                *ext_proc_filters(self.resources, policy, self.options),
                *wasm_filters(self.resources, policy, self.options),
            ]
            for pf in found:
                if pf.cluster is not None:
                    self.clusters[pf.cluster.name] = pf.cluster
            self._policy_filters[key] = found
        return self._policy_filters[key]

    def _add_cluster(self, cluster: Any) -> str:
        existing = self.clusters.get(cluster.name)
        if existing is not None and existing != cluster:
            raise ConfigError(
                f"cluster {cluster.name}: the rule is attached to Gateways with different "
                "BackendTrafficPolicies; target the HTTPRoute instead"
            )
        self.clusters[cluster.name] = cluster
        return str(cluster.name)

    def _route_action(
        self, route: Resource, index: int, rule: dict[str, Any], table: RouteTable, listener: str
    ) -> Any | None:
        """The RouteAction for one rule; None when no backend can take traffic (Envoy answers 500)."""
        from envoy_data_plane.envoy.config.route.v3 import (
            RouteAction,
            RouteActionClusterNotFoundResponseCode,
            RouteActionUpgradeConfig,
            WeightedCluster,
            WeightedClusterClusterWeight,
        )
        from envoy_data_plane.envoy.type.matcher.v3 import RegexMatchAndSubstitute, RegexMatcher

        refs = rule.get("backendRefs") or []
        if not refs:
            return None
        btp = attached_policy(self.resources, "BackendTrafficPolicy", route, table.gateway, listener, rule.get("name"))
        lb, hash_policies = load_balancing(btp)
        path = f"spec.rules[{index}].backendRefs"
        targets, unresolved = rule_backends(self.resources, route, rule)
        total = sum(t.weight for t in targets) + sum(u.weight for u in unresolved)
        for bad in unresolved:
            where = route.where(f"{path}[{bad.index}]")
            if where not in self._warned:
                self._warned.add(where)
                log.warning(
                    "%s: %s; its share (%d/%d) answers 500, as in EG (%s)",
                    where,
                    bad.message,
                    bad.weight,
                    total,
                    bad.reason,
                )
        name = f"httproute/{route.namespace}/{route.name}/rule/{index}"
        if not targets:
            return None  # nothing resolves (or every weight is 0): the route answers 500
        action = RouteAction(hash_policy=hash_policies)
        split = bool(unresolved) or _needs_cluster_per_backend(self.resources, targets)
        fallbacks = [t.resource.name for t in targets if t.resource.spec.get("fallback") is True]
        if split and fallbacks and len(targets) > 1:
            # In a cluster of its own a fallback Backend would take its weighted share all the time.
            raise ConfigError(
                f"{route.where(path)}: fallback Backend {fallbacks[0]} needs one cluster with the rule's other "
                "backends, which differ in address type, TLS or protocol (or a backendRef does not resolve); "
                "give them the same, or drop fallback"
            )
        if split:
            # EG: one cluster per resolved backendRef, weighted; and for the unresolved share an entry
            # naming a cluster that does not exist, so that Envoy answers 500 exactly for that share.
            invalid = sum(u.weight for u in unresolved)
            clusters = [WeightedClusterClusterWeight(name=INVALID_BACKEND_CLUSTER, weight=invalid)] if invalid else []
            for position, target in enumerate(targets):
                cluster = build_cluster(
                    f"{name}/backend/{position}", [target], self.resources, self.options, owner=route.where(path), lb=lb
                )
                clusters.append(WeightedClusterClusterWeight(name=self._add_cluster(cluster), weight=target.weight))
            action.weighted_clusters = WeightedCluster(clusters=clusters)
            if invalid:
                action.cluster_not_found_response_code = RouteActionClusterNotFoundResponseCode.INTERNAL_SERVER_ERROR
                table.names_missing_cluster = True
        else:
            cluster = build_cluster(name, targets, self.resources, self.options, owner=route.where(path), lb=lb)
            action.cluster = self._add_cluster(cluster)
        # EG lets WebSocket upgrades through on every route.
        action.upgrade_configs = [RouteActionUpgradeConfig(upgrade_type="websocket")]
        timeout = (rule.get("timeouts") or {}).get("request")
        if timeout:
            action.timeout = parse_duration(timeout)
        for flt in rule.get("filters") or []:
            if flt["type"] != "URLRewrite":
                continue
            rewrite = flt["urlRewrite"]
            if rewrite.get("hostname"):
                action.host_rewrite_literal = rewrite["hostname"]
            modifier = rewrite.get("path")
            if modifier and modifier["type"] == "ReplacePrefixMatch":
                action.prefix_rewrite = modifier.get("replacePrefixMatch", "/") or "/"
            elif modifier:
                action.regex_rewrite = RegexMatchAndSubstitute(
                    pattern=RegexMatcher(regex="^/.*$"), substitution=modifier["replaceFullPath"]
                )
        return action
