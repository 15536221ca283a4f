"""A minimal Envoy bootstrap for the sidecar: listener -> HCM -> ext_proc -> router -> upstream.

Built from envoy-data-plane's typed messages (imported lazily: they take ~0.5 s to import) and rendered
as snake_case proto-JSON, the form Envoy reads as YAML. The ext_proc `processing_mode` is the union the
registry derived from the plugins' hooks, so code and config cannot drift; routes pick their chain with
`grpc_initial_metadata` in a per-route override.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.chains import FULL_DUPLEX, SEND, Registry
from sidecar.config import SidecarConfig
from sidecar.errors import ConfigError
from sidecar.translate.backends import route_around_failed_workers, sidecar_retry_policy
from sidecar.wire import CHAIN_METADATA_KEY

__all__ = [
    "BootstrapOptions",
    "RouteSpec",
    "build_bootstrap",
    "check_processing_mode",
    "ext_proc_filter",
    "parse_route",
]

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
SIDECAR_CLUSTER = "envoy-sidecar"
UPSTREAM_CLUSTER = "upstream"
OTLP_CLUSTER = "otlp-collector"
LISTENER_NAME = "main"


@dataclass(frozen=True)
class RouteSpec:
    prefix: str
    chain: str | None = None  # None: the default chain


@dataclass(frozen=True)
class BootstrapOptions:
    listen_host: str = "127.0.0.1"
    listen_port: int = 10000
    upstream: tuple[str, int] = ("127.0.0.1", 8080)
    routes: tuple[RouteSpec, ...] = (RouteSpec("/"),)
    #: Let requests through unprocessed when the sidecar cannot be reached, times out or fails its stream
    #: (Envoy's `failure_mode_allow`). Plugin errors still follow each chain's `on_error`: the sidecar
    #: answers them itself.
    failure_mode_allow: bool = False
    #: A file for Envoy's access log, one JSON line per request with the plugins' dynamic metadata.
    access_log: str | None = None
    #: An OTLP gRPC collector: Envoy's own OpenTelemetry tracer sends its spans there, every request sampled.
    otlp_endpoint: tuple[str, int] | None = None


def parse_route(value: str) -> RouteSpec:
    prefix, sep, chain = value.partition("=")
    if not prefix.startswith("/") or (sep and not chain):
        raise ConfigError(f"--route: expected PREFIX[=CHAIN] with PREFIX starting with '/', got {value!r}")
    return RouteSpec(prefix, chain or None)


def _any(message: Any) -> Any:
    from envoy_data_plane.google.protobuf import Any as AnyMessage

    return AnyMessage.pack(message)


def _socket(host: str, port: int) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress

    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _sidecar_cluster(sockets: Sequence[Path]) -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
    from envoy_data_plane.envoy.config.core.v3 import Address, Http2ProtocolOptions, Pipe
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )

    endpoints = [LbEndpoint(endpoint=Endpoint(address=Address(pipe=Pipe(path=str(s))))) for s in sockets]
    cluster = Cluster(
        name=SIDECAR_CLUSTER,
        type=ClusterDiscoveryType.STATIC,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                HttpProtocolOptions(
                    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                        http2_protocol_options=Http2ProtocolOptions()
                    )
                )
            )
        },
        load_assignment=ClusterLoadAssignment(
            cluster_name=SIDECAR_CLUSTER, endpoints=[LocalityLbEndpoints(lb_endpoints=endpoints)]
        ),
    )
    route_around_failed_workers(cluster, len(sockets))
    return cluster


def _upstream_cluster(host: str, port: int) -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )

    return Cluster(
        name=UPSTREAM_CLUSTER,
        type=ClusterDiscoveryType.STATIC
        if host.replace(".", "").isdigit() or ":" in host
        else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=datetime.timedelta(seconds=2),
        load_assignment=ClusterLoadAssignment(
            cluster_name=UPSTREAM_CLUSTER,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_socket(host, port)))])],
        ),
    )


def _otlp_tracing(host: str, port: int) -> tuple[Any, Any]:
    """Envoy's OpenTelemetry tracer for the HCM (it puts `traceparent` in the ext_proc stream's metadata,
    so the sidecar's spans join Envoy's trace) and the collector's HTTP/2 cluster."""
    from envoy_data_plane.envoy.config.core.v3 import GrpcService, GrpcServiceEnvoyGrpc, Http2ProtocolOptions
    from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManagerTracing,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )
    from envoy_data_plane.envoy.type.v3 import Percent

    otel = OpenTelemetryConfig(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=OTLP_CLUSTER), timeout=datetime.timedelta(seconds=1)
        ),
        service_name="envoy",
    )
    tracing = HttpConnectionManagerTracing(
        random_sampling=Percent(value=100.0),
        provider=TracingHttp(name="envoy.tracers.opentelemetry", typed_config=_any(otel)),
    )
    cluster = _upstream_cluster(host, port)
    cluster.name = cluster.load_assignment.cluster_name = OTLP_CLUSTER
    cluster.typed_extension_protocol_options = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            HttpProtocolOptions(
                explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                    http2_protocol_options=Http2ProtocolOptions()
                )
            )
        )
    }
    return tracing, cluster


def check_processing_mode(mode: Any, *, failure_mode_allow: bool, where: str = "ext_proc") -> None:
    """Refuse what Envoy 1.40 accepts but cannot do: FULL_DUPLEX_STREAMED needs trailers SEND in its
    direction (Envoy checks that too) and no fail-open (Envoy validates it, then fails closed anyway)."""
    for direction in ("request", "response"):
        if getattr(mode, f"{direction}_body_mode") != FULL_DUPLEX:
            continue
        if getattr(mode, f"{direction}_trailer_mode") != SEND:
            raise ConfigError(
                f"{where}: {direction}_body_mode FULL_DUPLEX_STREAMED needs {direction}_trailer_mode SEND "
                "(trailers may end the body)"
            )
        if failure_mode_allow:
            raise ConfigError(
                f"{where}: {direction}_body_mode FULL_DUPLEX_STREAMED cannot fail open "
                "(failure_mode_allow / failOpen must be false)"
            )


def ext_proc_filter(registry: Registry, config: SidecarConfig, *, failure_mode_allow: bool = False) -> Any:
    """The `envoy.filters.http.ext_proc` HttpFilter that talks to this sidecar.

    It fails closed (`failure_mode_allow: false`) unless the operator asks otherwise (`--failure-mode-allow`):
    a route whose chain is `fail_open` opens it in its per-route override (`_route`). Either way a plugin's
    error follows its chain's `on_error`, because the sidecar answers it; `failure_mode_allow` covers only
    a sidecar that cannot be reached, times out or fails the stream. Refused with FULL_DUPLEX_STREAMED.
    """
    from envoy_data_plane.envoy.config.core.v3 import GrpcService, GrpcServiceEnvoyGrpc
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
        ExternalProcessor,
        MetadataOptions,
        MetadataOptionsMetadataNamespaces,
        ProcessingMode,
    )
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter

    check_processing_mode(registry.mode, failure_mode_allow=failure_mode_allow)
    timeout = datetime.timedelta(seconds=config.message_timeout)
    processor = ExternalProcessor(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SIDECAR_CLUSTER),
            timeout=datetime.timedelta(seconds=5),
            retry_policy=sidecar_retry_policy(),
        ),
        failure_mode_allow=failure_mode_allow,
        processing_mode=ProcessingMode.FromString(registry.mode.SerializeToString()),
        message_timeout=timeout,
        max_message_timeout=max(timeout, datetime.timedelta(seconds=10)),
        allow_mode_override=True,
        # What the plugins declared: Envoy drops metadata in a namespace it was not told to accept, and sends
        # only the attributes and metadata it was asked for.
        metadata_options=MetadataOptions(
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=list(registry.metadata_namespaces)),
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=list(registry.forwarding_namespaces)),
        ),
        request_attributes=list(registry.request_attributes),
        response_attributes=list(registry.response_attributes),
        stat_prefix="sidecar",
        # Envoy sends and does not wait: observe-only plugins run off the request path.
        observability_mode=registry.observe_only,
    )
    return HttpFilter(name=EXT_PROC_FILTER, typed_config=_any(processor))


#: Per request, besides the plugins' metadata: enough to find the request and see how it ended.
_ACCESS_LOG_FIELDS = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%PATH(NQ)%",  # never the query string: it carries tokens and pre-signed URLs
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}


def access_log(path: str, registry: Registry) -> Any:
    """A file access log of JSON lines that holds every namespace the plugins write (`metadata_namespaces`)."""
    from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
    from envoy_data_plane.envoy.config.core.v3 import SubstitutionFormatString
    from envoy_data_plane.envoy.extensions.access_loggers.file.v3 import FileAccessLog
    from envoy_data_plane.google.protobuf import Struct

    if not path or any(c in path for c in "\r\n\0"):
        raise ConfigError(f"--access-log: expected a file path, got {path!r}")
    fields: dict[str, Any] = dict(_ACCESS_LOG_FIELDS)
    for namespace in registry.metadata_namespaces:
        fields[f"metadata.{namespace}"] = f"%DYNAMIC_METADATA({namespace})%"
    log_format = SubstitutionFormatString(json_format=Struct.from_dict(fields))
    file_log = FileAccessLog(path=path, log_format=log_format)
    return AccessLog(name="envoy.access_loggers.file", typed_config=_any(file_log))


def _route(spec: RouteSpec, registry: Registry) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import HeaderValue
    from envoy_data_plane.envoy.config.route.v3 import Route, RouteAction, RouteMatch
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ExtProcOverrides, ExtProcPerRoute

    route = Route(
        match=RouteMatch(prefix=spec.prefix),
        route=RouteAction(cluster=UPSTREAM_CLUSTER),
    )
    chain = registry.chain(spec.chain)
    if chain is None:
        raise ConfigError(
            f"--route {spec.prefix}={spec.chain}: no chain named {spec.chain!r} "
            f"(chains: {', '.join(sorted(registry.chains))})"
        )
    overrides = ExtProcOverrides()
    if spec.chain is not None:
        overrides.grpc_initial_metadata = [HeaderValue(key=CHAIN_METADATA_KEY, value=spec.chain)]
    fail_open = chain.fail_open and not registry.full_duplex
    if fail_open:
        # fail_open covers the sidecar too: a message timeout or an unreachable sidecar lets this route's
        # requests through unprocessed, as a raising plugin does. Not when any chain makes the filter
        # FULL_DUPLEX_STREAMED: Envoy then runs every stream in that mode, which cannot fail open.
        overrides.failure_mode_allow = True
    if spec.chain is not None or fail_open:
        route.typed_per_filter_config = {EXT_PROC_FILTER: _any(ExtProcPerRoute(overrides=overrides))}
    return route


def build_bootstrap(registry: Registry, config: SidecarConfig, options: BootstrapOptions) -> dict[str, Any]:
    """The whole bootstrap as a plain dict (what `envoy -c` reads as YAML)."""
    import betterproto2
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap, BootstrapStaticResources
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration, VirtualHost
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpFilter,
    )

    # Longest prefix first, so `/admin` wins over `/`.
    routes = [_route(r, registry) for r in sorted(options.routes, key=lambda r: len(r.prefix), reverse=True)]
    hcm = HttpConnectionManager(
        stat_prefix="ingress",
        route_config=RouteConfiguration(
            name="local", virtual_hosts=[VirtualHost(name="all", domains=["*"], routes=routes)]
        ),
        http_filters=[
            ext_proc_filter(registry, config, failure_mode_allow=options.failure_mode_allow),
            HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router())),
        ],
        access_log=[access_log(options.access_log, registry)] if options.access_log is not None else [],
    )
    listener = Listener(
        name=LISTENER_NAME,
        address=_socket(options.listen_host, options.listen_port),
        filter_chains=[
            FilterChain(filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm))])
        ],
    )
    clusters = [_sidecar_cluster(config.socket_paths()), _upstream_cluster(*options.upstream)]
    if options.otlp_endpoint is not None:
        hcm.tracing, collector = _otlp_tracing(*options.otlp_endpoint)
        clusters.append(collector)
        listener.filter_chains[0].filters[0].typed_config = _any(hcm)
    bootstrap = Bootstrap(static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters))
    result: dict[str, Any] = bootstrap.to_dict(casing=betterproto2.Casing.SNAKE)
    return result
