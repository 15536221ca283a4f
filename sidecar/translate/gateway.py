"""Gateways -> Envoy listeners: one per port, with an HTTP connection manager (HCM) per filter chain.

Gateway listeners sharing a port share one Envoy listener: HTTP ones one HCM, HTTPS ones a filter chain
each (TLS from their certificateRefs, matched by SNI when they have a hostname). Each HCM gets the routes
attached to its listeners (routes.py), the HTTP filters those routes switch on in EG's order with the
Gateway's EnvoyProxy filterOrder applied (order.py), the router last, and the client IP detection of
the ClientTrafficPolicy in force (policies.py). Naming follows EG so configs can be compared: listener,
filter chain and route config `<ns>/<gateway>/<listener>`.
"""

from __future__ import annotations

import logging
from typing import Any

from sidecar.translate.attachment import client_traffic_policy
from sidecar.translate.certificates import ListenerCertificates, listener_certificates
from sidecar.translate.clientip import client_ip_settings
from sidecar.translate.listeners import ListenerVerdict, listener_verdicts
from sidecar.translate.messages import address, pack
from sidecar.translate.options import RenderOptions
from sidecar.translate.order import ROUTER, order_filters
from sidecar.translate.refs import attached_routes, gateway_envoy_proxy, unresolved_parameters_ref
from sidecar.translate.resources import Resource, ResourceSet
from sidecar.translate.routes import RouteBuilder, RouteTable

__all__ = ["build_listeners", "listener_name"]

log = logging.getLogger(__name__)


def listener_name(gateway: Resource, listener: str) -> str:
    return f"{gateway.namespace}/{gateway.name}/{listener}"


def build_listeners(resources: ResourceSet, options: RenderOptions, clusters: dict[str, Any]) -> list[Any]:
    """The Envoy listeners of every Gateway in `resources`; the clusters their routes use go into `clusters`."""
    from envoy_data_plane.envoy.config.listener.v3 import (
        Filter,
        FilterChain,
        FilterChainMatch,
        Listener,
        ListenerFilter,
    )
    from envoy_data_plane.envoy.extensions.filters.listener.tls_inspector.v3 import TlsInspector

    routes = RouteBuilder(resources, options, clusters)
    result = []
    bound: dict[int, str] = {}
    for gateway in resources.of("Gateway"):
        unresolved = unresolved_parameters_ref(resources, gateway)
        if unresolved is not None:
            log.warning(
                "%s: %s; the Gateway gets the settings of the EnvoyProxy no Gateway references, or the "
                "defaults, as in EG",
                gateway.where("spec.infrastructure.parametersRef"),
                unresolved,
            )
        by_port: dict[int, list[dict[str, Any]]] = {}
        certificates: dict[str, ListenerCertificates] = {}
        for verdict in listener_verdicts(resources, gateway):
            listener = verdict.listener
            if listener["protocol"] == "HTTPS" and verdict.field != "tls":  # EG reads no certificate of bad tls
                certificates[listener["name"]] = _certificates(resources, gateway, listener)
            if not verdict.served:
                _refused(gateway, verdict)
                continue
            by_port.setdefault(listener["port"], []).append(listener)
        for port, group in sorted(by_port.items()):
            name = listener_name(gateway, group[0]["name"])
            # One protocol per port: EG refuses every listener of a port that mixes them (listeners.py).
            protocols = {li["protocol"] for li in group}
            envoy_port = options.listener_port(port)
            if envoy_port and envoy_port in bound:
                raise gateway.error("spec.listeners", f"port {port} is already used by {bound[envoy_port]}")
            bound[envoy_port] = name
            chains = [[li] for li in group] if protocols == {"HTTPS"} else [group]
            filter_chains = []
            for members in chains:
                table = RouteTable(listener_name(gateway, members[0]["name"]), gateway, members)
                hcm = _hcm(resources, routes, table)
                hcm_filter = Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))
                fc = FilterChain(name=table.name, filters=[hcm_filter])
                if protocols == {"HTTPS"}:
                    fc.transport_socket = _tls(certificates[members[0]["name"]])
                    if members[0].get("hostname"):
                        fc.filter_chain_match = FilterChainMatch(server_names=[members[0]["hostname"]])
                filter_chains.append(fc)
            envoy_listener = Listener(
                name=name,
                address=address(options.listen_address, envoy_port),
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


def _hcm(resources: ResourceSet, routes: RouteBuilder, table: RouteTable) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import (
        Http2ProtocolOptions,
        HttpProtocolOptions,
        HttpProtocolOptionsHeadersWithUnderscoresAction,
    )
    from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpConnectionManagerPathWithEscapedSlashesAction,
        HttpConnectionManagerServerHeaderTransformation,
        HttpFilter,
    )

    for listener in table.listeners:
        for route in attached_routes(resources, table.gateway, listener["name"]):
            routes.add(table, route, listener)
    virtual_hosts = table.virtual_hosts()
    filters = [*table.filters.values(), HttpFilter(name=ROUTER, typed_config=pack(Router(suppress_envoy_headers=True)))]
    route_config = RouteConfiguration(name=table.name, ignore_port_in_host_matching=True, virtual_hosts=virtual_hosts)
    if table.names_missing_cluster:
        route_config.validate_clusters = False
    hcm = HttpConnectionManager(
        stat_prefix=table.name.replace("/", "_"),
        route_config=route_config,
        http_filters=order_filters(filters, _filter_moves(resources, table.gateway)),
        # EG's listener defaults, which decide what a path means before any route or policy sees it:
        # `//admin`, `/./admin` and `/x/../admin` are `/admin`, and `%2F` is unescaped with a redirect, so a
        # route (and the policies on it) cannot be bypassed by spelling its path another way; headers with
        # underscores are refused (a proxy may read them as their dashed twins); Envoy's own headers are not
        # sent upstream; the backend's Server header passes through.
        merge_slashes=True,
        normalize_path=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.UNESCAPE_AND_REDIRECT,
        common_http_protocol_options=HttpProtocolOptions(
            headers_with_underscores_action=HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST
        ),
        http2_protocol_options=Http2ProtocolOptions(
            initial_connection_window_size=1048576, initial_stream_window_size=65536, max_concurrent_streams=100
        ),
        server_header_transformation=HttpConnectionManagerServerHeaderTransformation.PASS_THROUGH,
    )
    client_ip_settings(client_traffic_policy(resources, table.gateway, table.listeners), hcm)
    return hcm


def _filter_moves(resources: ResourceSet, gateway: Resource) -> list[dict[str, str]]:
    proxy = gateway_envoy_proxy(resources, gateway)
    return list(proxy.spec.get("filterOrder") or []) if proxy else []


def _certificates(resources: ResourceSet, gateway: Resource, listener: dict[str, Any]) -> ListenerCertificates:
    """The listener's certificates as EG resolves them, with a warning for each one left out."""
    index = gateway.spec["listeners"].index(listener)
    found = listener_certificates(resources, gateway, listener)
    where = gateway.where(f"spec.listeners[{index}].tls")
    for problem in found.problems:
        log.warning("%s.%s; left out, as in EG (%s)", where, problem, found.reason)
    if not found.programmed:
        log.warning(
            "%s: no usable certificate, so listener %r is not served (EG: not programmed); its routes get no "
            "connection on port %s",
            where,
            listener["name"],
            listener["port"],
        )
    return found


def _refused(gateway: Resource, verdict: ListenerVerdict) -> None:
    """One warning line for a listener EG refuses (a certificate problem has its own, from _certificates)."""
    if verdict.field == "tls.certificateRefs":
        return
    log.warning(
        "%s: %s, so listener %r is not served (EG: %s); its routes get no connection on port %s",
        gateway.where(f"spec.listeners[{verdict.index}].{verdict.field}"),
        verdict.why,
        verdict.listener["name"],
        verdict.reason,
        verdict.listener["port"],
    )


def _tls(certificates: ListenerCertificates) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import DataSource, TransportSocket
    from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
        CommonTlsContext,
        DownstreamTlsContext,
        TlsCertificate,
    )

    served = [
        TlsCertificate(certificate_chain=DataSource(inline_string=chain), private_key=DataSource(inline_string=key))
        for chain, key in certificates.pairs
    ]
    context = DownstreamTlsContext(
        common_tls_context=CommonTlsContext(tls_certificates=served, alpn_protocols=["h2", "http/1.1"])
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(context))
