"""Gateway listeners and HTTPRoutes -> Envoy listeners, virtual hosts and routes; the whole bootstrap.

Naming follows EG so configs can be compared: listener and route config `<ns>/<gateway>/<listener>`,
virtual host `.../<hostname with dots as underscores>`, route `httproute/<ns>/<name>/rule/<r>/match/<m>/...`,
cluster `httproute/<ns>/<name>/rule/<r>`. Gateway listeners sharing a port share one Envoy listener:
HTTP ones one connection manager, HTTPS ones a filter chain each (matched by SNI when they have a
hostname). Routes in a virtual host are ordered by Gateway API precedence: Exact, then regular
expression, then prefix; longer paths first; then method matches, then more header/query matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sidecar.errors import ConfigError
from sidecar.translate.backends import build_cluster
from sidecar.translate.messages import address, enable_on_route, pack, parse_duration
from sidecar.translate.options import RenderOptions
from sidecar.translate.order import ROUTER, order_filters
from sidecar.translate.policies import (
    RBAC,
    PolicyFilter,
    client_ip_settings,
    ext_proc_filters,
    finish_per_filter_configs,
    load_balancing,
    rbac_filter,
    rbac_per_route,
    wasm_filters,
)
from sidecar.translate.refs import (
    attached_policy,
    attached_routes,
    backend_ref_target,
    client_traffic_policy,
    gateway_envoy_proxy,
    host_intersection,
    listener_certificates,
)
from sidecar.translate.resources import Resource, ResourceSet

__all__ = ["build_bootstrap_from_resources", "listener_name"]

_PATH_RANK = {"Exact": 0, "RegularExpression": 1, "PathPrefix": 2}
_REDIRECT_CODES = {
    301: "MOVED_PERMANENTLY",
    302: "FOUND",
    303: "SEE_OTHER",
    307: "TEMPORARY_REDIRECT",
    308: "PERMANENT_REDIRECT",
}


def listener_name(gateway: Resource, listener: str) -> str:
    return f"{gateway.namespace}/{gateway.name}/{listener}"


def _header_options(modifier: dict[str, Any]) -> list[Any]:
    from envoy_data_plane.envoy.config.core.v3 import (
        HeaderValue,
        HeaderValueOption,
        HeaderValueOptionHeaderAppendAction,
    )

    options = []
    for verb, action in (("set", "OVERWRITE_IF_EXISTS_OR_ADD"), ("add", "APPEND_IF_EXISTS_OR_ADD")):
        for header in modifier.get(verb) or []:
            options.append(
                HeaderValueOption(
                    header=HeaderValue(key=header["name"], value=header["value"]),
                    append_action=HeaderValueOptionHeaderAppendAction[action],
                )
            )
    return options


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


@dataclass
class _Chain:
    """One HCM being built: its virtual hosts, the filters its routes need, its clusters."""

    name: str
    gateway: Resource
    listeners: list[dict[str, Any]]
    vhosts: dict[str, Any] = field(default_factory=dict)
    filters: dict[str, Any] = field(default_factory=dict)
    routes: list[tuple[tuple[Any, ...], str, Any]] = field(default_factory=list)


class _Builder:
    def __init__(self, resources: ResourceSet, options: RenderOptions) -> None:
        self.resources = resources
        self.options = options
        self.clusters: dict[str, Any] = {}
        self._policy_filters: dict[tuple[str, str], list[PolicyFilter]] = {}

    # -- policies ----------------------------------------------------------------------------------

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

    # -- routes ------------------------------------------------------------------------------------

    def _route_action(
        self, route: Resource, index: int, rule: dict[str, Any], chain: _Chain, listener: str
    ) -> Any | None:
        """The RouteAction for one rule; None when no backend can take traffic (Envoy answers 500)."""
        from envoy_data_plane.envoy.config.route.v3 import RouteAction, RouteActionUpgradeConfig
        from envoy_data_plane.envoy.type.matcher.v3 import RegexMatchAndSubstitute, RegexMatcher

        refs = rule.get("backendRefs") or []
        if not refs:
            return None
        btp = attached_policy(self.resources, "BackendTrafficPolicy", route, chain.gateway, listener)
        lb, hash_policies = load_balancing(btp)
        path = f"spec.rules[{index}].backendRefs"
        targets = [backend_ref_target(self.resources, route, ref, f"{path}[{i}]") for i, ref in enumerate(refs)]
        name = f"httproute/{route.namespace}/{route.name}/rule/{index}"
        if not any(t.weight for t in targets):
            return None
        cluster = build_cluster(name, targets, self.resources, self.options, owner=route.where(path), lb=lb)
        # EG lets WebSocket upgrades through on every route.
        action = RouteAction(
            cluster=self._add_cluster(cluster),
            hash_policy=hash_policies,
            upgrade_configs=[RouteActionUpgradeConfig(upgrade_type="websocket")],
        )
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

    def _redirect(self, spec: dict[str, Any]) -> Any:
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

    def _add_route(self, chain: _Chain, route: Resource, listener: dict[str, Any]) -> None:
        from envoy_data_plane.envoy.config.route.v3 import DirectResponseAction, Route, VirtualHost

        hosts = []
        for host in route.spec.get("hostnames") or [listener.get("hostname") or "*"]:
            served = host_intersection(host, listener.get("hostname"))
            if served is not None:
                hosts.append(served)
        eep = attached_policy(self.resources, "EnvoyExtensionPolicy", route, chain.gateway, listener["name"])
        security = attached_policy(self.resources, "SecurityPolicy", route, chain.gateway, listener["name"])
        per_filter: dict[str, Any] = {}
        for pf in self._filters_of(eep) if eep else []:
            chain.filters[pf.name] = pf.filter
            per_filter[pf.name] = enable_on_route()
        rbac = rbac_per_route(security) if security else None
        if rbac is not None:
            chain.filters[RBAC] = rbac_filter()
            per_filter[RBAC] = pack(rbac)
        rules = route.spec.get("rules") or [{}]
        for r, rule in enumerate(rules):
            action = self._route_action(route, r, rule, chain, listener["name"])
            filters = rule.get("filters") or []
            for m, match in enumerate(rule.get("matches") or [{}]):
                for host in hosts:
                    host_key = host.replace(".", "_").replace("*", "wildcard")
                    envoy_route = Route(
                        name=f"httproute/{route.namespace}/{route.name}/rule/{r}/match/{m}/{host_key}",
                        match=_route_match(match),
                        typed_per_filter_config=dict(per_filter),
                    )
                    redirect = next((f["requestRedirect"] for f in filters if f["type"] == "RequestRedirect"), None)
                    if redirect is not None:
                        envoy_route.redirect = self._redirect(redirect)
                    elif action is not None:
                        envoy_route.route = action
                    else:
                        envoy_route.direct_response = DirectResponseAction(status=500)
                    for flt in filters:
                        if flt["type"] == "RequestHeaderModifier":
                            envoy_route.request_headers_to_add = _header_options(flt["requestHeaderModifier"])
                            envoy_route.request_headers_to_remove = list(flt["requestHeaderModifier"].get("remove", []))
                        elif flt["type"] == "ResponseHeaderModifier":
                            envoy_route.response_headers_to_add = _header_options(flt["responseHeaderModifier"])
                            envoy_route.response_headers_to_remove = list(
                                flt["responseHeaderModifier"].get("remove", [])
                            )
                    vhost_name = f"{chain.name}/{host_key}"
                    if host not in chain.vhosts:
                        chain.vhosts[host] = VirtualHost(name=vhost_name, domains=[host])
                    chain.routes.append(((host, *_precedence(match), len(chain.routes)), host, envoy_route))

    # -- listeners ---------------------------------------------------------------------------------

    def _hcm(self, chain: _Chain) -> Any:
        from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
        from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
        from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
            HttpConnectionManager,
            HttpFilter,
        )

        for listener in chain.listeners:
            for route in attached_routes(self.resources, chain.gateway, listener["name"]):
                self._add_route(chain, route, listener)
        for _, host, envoy_route in sorted(chain.routes, key=lambda item: item[0]):
            chain.vhosts[host].routes.append(envoy_route)
        filters = [*chain.filters.values(), HttpFilter(name=ROUTER, typed_config=pack(Router()))]
        hcm = HttpConnectionManager(
            stat_prefix=chain.name.replace("/", "_"),
            route_config=RouteConfiguration(
                name=chain.name,
                ignore_port_in_host_matching=True,
                # Exact hostnames before wildcards before the catch-all, as Envoy prefers them anyway.
                virtual_hosts=[chain.vhosts[h] for h in sorted(chain.vhosts, key=lambda h: (h == "*", h))],
            ),
            http_filters=order_filters(filters, self._filter_moves(chain.gateway)),
            use_remote_address=True,
        )
        ctp = client_traffic_policy(self.resources, chain.gateway, chain.listeners)
        if ctp is not None:
            client_ip_settings(ctp, hcm)
        return hcm

    def _filter_moves(self, gateway: Resource) -> list[dict[str, str]]:
        proxy = gateway_envoy_proxy(self.resources, gateway)
        return list(proxy.spec.get("filterOrder") or []) if proxy else []

    def _tls(self, gateway: Resource, listener: dict[str, Any]) -> Any:
        from envoy_data_plane.envoy.config.core.v3 import DataSource, TransportSocket
        from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
            CommonTlsContext,
            DownstreamTlsContext,
            TlsCertificate,
        )

        certificates = [
            TlsCertificate(certificate_chain=DataSource(inline_string=chain), private_key=DataSource(inline_string=key))
            for chain, key in listener_certificates(self.resources, gateway, listener)
        ]
        context = DownstreamTlsContext(
            common_tls_context=CommonTlsContext(tls_certificates=certificates, alpn_protocols=["h2", "http/1.1"])
        )
        return TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(context))

    def listeners(self) -> list[Any]:
        from envoy_data_plane.envoy.config.listener.v3 import (
            Filter,
            FilterChain,
            FilterChainMatch,
            Listener,
            ListenerFilter,
        )
        from envoy_data_plane.envoy.extensions.filters.listener.tls_inspector.v3 import TlsInspector

        result = []
        bound: dict[int, str] = {}
        for gateway in self.resources.of("Gateway"):
            by_port: dict[int, list[dict[str, Any]]] = {}
            for listener in gateway.spec["listeners"]:
                by_port.setdefault(listener["port"], []).append(listener)
            for port, group in sorted(by_port.items()):
                name = listener_name(gateway, group[0]["name"])
                protocols = {li["protocol"] for li in group}
                if len(protocols) > 1:
                    raise gateway.error("spec.listeners", f"port {port} mixes HTTP and HTTPS listeners")
                envoy_port = self.options.listener_port(port)
                if envoy_port and envoy_port in bound:
                    raise gateway.error("spec.listeners", f"port {port} is already used by {bound[envoy_port]}")
                bound[envoy_port] = name
                chains = [[li] for li in group] if protocols == {"HTTPS"} else [group]
                filter_chains = []
                for members in chains:
                    chain = _Chain(listener_name(gateway, members[0]["name"]), gateway, members)
                    hcm = self._hcm(chain)
                    hcm_filter = Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))
                    fc = FilterChain(name=chain.name, filters=[hcm_filter])
                    if protocols == {"HTTPS"}:
                        fc.transport_socket = self._tls(gateway, members[0])
                        if members[0].get("hostname"):
                            fc.filter_chain_match = FilterChainMatch(server_names=[members[0]["hostname"]])
                    filter_chains.append(fc)
                envoy_listener = Listener(
                    name=name,
                    address=address(self.options.listen_address, envoy_port),
                    filter_chains=filter_chains,
                    per_connection_buffer_limit_bytes=32768,
                )
                if protocols == {"HTTPS"}:
                    # Reads the SNI before a filter chain is chosen; Envoy no longer adds it by itself.
                    envoy_listener.listener_filters = [
                        ListenerFilter(name="envoy.filters.listener.tls_inspector", typed_config=pack(TlsInspector()))
                    ]
                result.append(envoy_listener)
        return result


def build_bootstrap_from_resources(resources: ResourceSet, options: RenderOptions) -> dict[str, Any]:
    """The Envoy bootstrap (static resources) for validated `resources`, as a plain dict."""
    import betterproto2
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap, BootstrapStaticResources

    builder = _Builder(resources, options)
    listeners = builder.listeners()
    clusters = [builder.clusters[name] for name in sorted(builder.clusters)]
    bootstrap = Bootstrap(static_resources=BootstrapStaticResources(listeners=listeners, clusters=clusters))
    result: dict[str, Any] = finish_per_filter_configs(bootstrap.to_dict(casing=betterproto2.Casing.SNAKE))
    return result
