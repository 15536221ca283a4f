"""Clusters: one per HTTPRoute rule and one per extProc entry, built from Backends as EG builds them.

Each backendRef of a rule becomes one locality of the rule's cluster, weighted by the backendRef weight
(so a consistent-hash policy spreads over *all* the rule's backends, as in EG). Endpoint kinds:
`ip` -> socket address, `fqdn` -> socket address in a STRICT_DNS cluster (LOGICAL_DNS with the
`envoy-sidecar/dns: logical` annotation), `unix` -> pipe. A Backend
listing `gateway.envoyproxy.io/h2c` speaks HTTP/2 without TLS; a BackendTLSPolicy targeting it adds an
UpstreamTlsContext (backendtls.py picks the policy and its CA; SNI = hostname, SANs as EG writes them).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.errors import ConfigError
from sidecar.translate.backendtls import UpstreamTls, upstream_tls
from sidecar.translate.messages import address, pack, parse_duration, pipe_address
from sidecar.translate.options import DNS_ANNOTATION, RenderOptions
from sidecar.translate.refs import BackendTarget, endpoint_kinds, service_address
from sidecar.translate.resources import ResourceSet
from sidecar.wire import SERVICE_NAME

__all__ = [
    "SIDECAR_FAULTS",
    "SYSTEM_CA_BUNDLE",
    "LoadBalancing",
    "SidecarFaults",
    "apply_backend_settings",
    "backend_retry_policy",
    "build_cluster",
    "eg_backend_settings",
    "route_around_failed_workers",
    "sidecar_retry_policy",
]

H2C = "gateway.envoyproxy.io/h2c"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True)
class LoadBalancing:
    """A BackendTrafficPolicy's loadBalancer, as the cluster needs it."""

    type: str = "LeastRequest"  # EG's default when no BackendTrafficPolicy says otherwise
    table_size: int | None = None

    @property
    def consistent(self) -> bool:
        return self.type == "ConsistentHash"


@dataclass(frozen=True)
class SidecarFaults:
    """How Envoy routes around a sidecar worker that died or stalled; every generated config uses these.

    `sidecar envoy-config`/`up` (bootstrap.py) and `render` (here) build them into the cluster and the
    ext_proc filter; `render --format eg` (bundle.py) and the Helm chart say the same in EG's
    `backendSettings` and the standalone bootstrap, and tests compare them. Measured in
    benchmarks/faults.py; the reasons are in docs/reliability.md.
    """

    #: A Unix socket connects at once or not at all: a dead worker is ECONNREFUSED, a full backlog waits.
    connect_timeout: float = 0.25
    #: Active gRPC health checks (several workers only). Envoy checks at `no_traffic_interval` (default
    #: 60 s) until it schedules a check after traffic started, so it is set to the interval too.
    health_interval: float = 0.5
    health_timeout: float = 0.25
    #: Passive: one local-origin failure (connect refused or timed out, the connection reset under a
    #: stream) ejects the worker at once; a passing health check brings it back.
    local_origin_failures: int = 1
    gateway_failures: int = 2
    ejection_time: float = 1.0
    max_ejection_time: float = 30.0
    max_ejection_percent: int = 50
    #: Retries of the ext_proc stream's *opening*: Envoy retries only while the sidecar has sent nothing
    #: back (no response headers), replaying the messages it kept, on another worker. It keeps at most
    #: 64 KiB (its async stream's limit, not configurable) and gives the retry up past it, so a FULL_DUPLEX
    #: upload that sent more before the sidecar answered has none (docs/streaming.md, "What Envoy keeps
    #: for the retry"); it never holds a whole body.
    retry_on: str = "connect-failure,refused-stream,reset,unavailable"
    num_retries: int = 2
    retry_base_interval: float = 0.01
    #: Envoy also makes this the per-try timeout, which starts only once the stream is half-closed.
    retry_max_interval: float = 0.05
    #: Concurrent retries over the cluster (Envoy's default is 3, which a dead worker under load exceeds).
    max_retries: int = 1024


SIDECAR_FAULTS = SidecarFaults()


def route_around_failed_workers(cluster: Any, workers: int, faults: SidecarFaults = SIDECAR_FAULTS) -> None:
    """Set the sidecar cluster's connect timeout, retry cap and, with several workers, health checks and
    outlier detection, so Envoy stops opening streams on a worker that died or stalled."""
    from envoy_data_plane.envoy.config.cluster.v3 import CircuitBreakers, CircuitBreakersThresholds, OutlierDetection
    from envoy_data_plane.envoy.config.core.v3 import HealthCheck, HealthCheckGrpcHealthCheck

    cluster.connect_timeout = datetime.timedelta(seconds=faults.connect_timeout)
    cluster.circuit_breakers = CircuitBreakers(thresholds=[CircuitBreakersThresholds(max_retries=faults.max_retries)])
    if workers < 2:
        return  # one worker: nowhere else to send a stream; ejecting it would only be ignored (panic mode)
    interval = datetime.timedelta(seconds=faults.health_interval)
    cluster.health_checks = [
        HealthCheck(
            timeout=datetime.timedelta(seconds=faults.health_timeout),
            interval=interval,
            no_traffic_interval=interval,
            unhealthy_threshold=1,
            healthy_threshold=1,
            grpc_health_check=HealthCheckGrpcHealthCheck(service_name=SERVICE_NAME),
        )
    ]
    cluster.outlier_detection = OutlierDetection(
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=faults.local_origin_failures,
        enforcing_consecutive_local_origin_failure=100,
        consecutive_gateway_failure=faults.gateway_failures,
        enforcing_consecutive_gateway_failure=100,
        interval=datetime.timedelta(seconds=1),
        base_ejection_time=datetime.timedelta(seconds=faults.ejection_time),
        max_ejection_time=datetime.timedelta(seconds=faults.max_ejection_time),
        max_ejection_percent=faults.max_ejection_percent,
    )


def sidecar_retry_policy(faults: SidecarFaults = SIDECAR_FAULTS) -> Any:
    """The ext_proc `grpc_service.retry_policy`: open the stream again on another worker."""
    from envoy_data_plane.envoy.config.core.v3 import BackoffStrategy, RetryPolicy, RetryPolicyRetryHostPredicate
    from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate

    return RetryPolicy(
        retry_on=faults.retry_on,
        num_retries=faults.num_retries,
        retry_back_off=BackoffStrategy(
            base_interval=datetime.timedelta(seconds=faults.retry_base_interval),
            max_interval=datetime.timedelta(seconds=faults.retry_max_interval),
        ),
        retry_host_predicate=[
            RetryPolicyRetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts", typed_config=pack(PreviousHostsPredicate())
            )
        ],
        host_selection_retry_max_attempts=3,
    )


def _eg_duration(seconds: float) -> str:
    return f"{seconds:g}s" if seconds == int(seconds) else f"{round(seconds * 1000)}ms"


def eg_backend_settings(workers: int, faults: SidecarFaults = SIDECAR_FAULTS) -> dict[str, Any]:
    """The same settings as an EnvoyExtensionPolicy extProc `backendSettings` (for `render --format eg`).

    EG has no `noTrafficInterval`: under EG the active check runs at Envoy's 60 s until traffic starts,
    so the passive ejection and the retry carry a fault there first.
    """
    settings: dict[str, Any] = {
        "timeout": {"tcp": {"connectTimeout": _eg_duration(faults.connect_timeout)}},
        "circuitBreaker": {"maxParallelRetries": faults.max_retries},
        "retry": {
            "numRetries": faults.num_retries,
            "retryOn": {"triggers": faults.retry_on.split(",")},
            "perRetry": {
                "backOff": {
                    "baseInterval": _eg_duration(faults.retry_base_interval),
                    "maxInterval": _eg_duration(faults.retry_max_interval),
                }
            },
        },
    }
    if workers > 1:
        settings["healthCheck"] = {
            "active": {
                "type": "GRPC",
                "grpc": {"service": SERVICE_NAME},
                "interval": _eg_duration(faults.health_interval),
                "timeout": _eg_duration(faults.health_timeout),
                "unhealthyThreshold": 1,
                "healthyThreshold": 1,
            },
            "passive": {
                "splitExternalLocalOriginErrors": True,
                "consecutiveLocalOriginFailures": faults.local_origin_failures,
                "consecutiveGatewayErrors": faults.gateway_failures,
                "interval": "1s",
                "baseEjectionTime": _eg_duration(faults.ejection_time),
                "maxEjectionPercent": faults.max_ejection_percent,
            },
        }
    return settings


# EG's CRD defaults for an extProc `backendSettings` (the API server fills them in before EG reads them).
_ACTIVE_DEFAULTS = {"interval": "3s", "timeout": "1s", "unhealthyThreshold": 3, "healthyThreshold": 1}
_PASSIVE_DEFAULTS = {
    "splitExternalLocalOriginErrors": False,
    "interval": "3s",
    "consecutiveLocalOriginFailures": 5,
    "consecutive5XxErrors": 5,
    "baseEjectionTime": "30s",
    "maxEjectionPercent": 10,
}
_NON_ROUTE_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


def apply_backend_settings(cluster: Any, settings: dict[str, Any]) -> None:
    """An extProc entry's `backendSettings` on its cluster, as EG's xDS translator writes them: the TCP
    connect timeout, the retry cap (circuit breaker), an active gRPC health check and outlier detection."""
    from envoy_data_plane.envoy.config.cluster.v3 import CircuitBreakers, CircuitBreakersThresholds, OutlierDetection
    from envoy_data_plane.envoy.config.core.v3 import HealthCheck, HealthCheckGrpcHealthCheck, RoutingPriority

    connect = ((settings.get("timeout") or {}).get("tcp") or {}).get("connectTimeout")
    if connect is not None:
        cluster.connect_timeout = parse_duration(connect)
    breaker = settings.get("circuitBreaker")
    if breaker is not None:
        cluster.circuit_breakers = CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(
                    priority=RoutingPriority.DEFAULT, max_retries=breaker.get("maxParallelRetries", 1024)
                )
            ]
        )
    checks = settings.get("healthCheck") or {}
    if checks.get("active") is not None:
        active = {**_ACTIVE_DEFAULTS, **checks["active"]}
        cluster.health_checks = [
            HealthCheck(
                timeout=parse_duration(active["timeout"]),
                interval=parse_duration(active["interval"]),
                unhealthy_threshold=active["unhealthyThreshold"],
                healthy_threshold=active["healthyThreshold"],
                grpc_health_check=HealthCheckGrpcHealthCheck(
                    service_name=(active.get("grpc") or {}).get("service", "")
                ),
            )
        ]
    if checks.get("passive") is not None:
        passive = {**_PASSIVE_DEFAULTS, **checks["passive"]}
        detection = OutlierDetection(
            split_external_local_origin_errors=passive["splitExternalLocalOriginErrors"],
            interval=parse_duration(passive["interval"]),
            base_ejection_time=parse_duration(passive["baseEjectionTime"]),
            consecutive_local_origin_failure=passive["consecutiveLocalOriginFailures"],
            consecutive_5xx=passive["consecutive5XxErrors"],
        )
        if passive["maxEjectionPercent"] > 0:
            detection.max_ejection_percent = passive["maxEjectionPercent"]
        if "consecutiveGatewayErrors" in passive:
            detection.consecutive_gateway_failure = passive["consecutiveGatewayErrors"]
            detection.enforcing_consecutive_gateway_failure = 100
        cluster.outlier_detection = detection


def backend_retry_policy(retry: dict[str, Any]) -> Any:
    """An extProc entry's `backendSettings.retry` as the gRPC stream's retry policy, as EG writes it:
    its triggers (else EG's non-route default), numRetries (2 by default) and the back-off."""
    from envoy_data_plane.envoy.config.core.v3 import BackoffStrategy, RetryPolicy

    triggers = (retry.get("retryOn") or {}).get("triggers")
    policy = RetryPolicy(
        retry_on=",".join(triggers) if triggers else _NON_ROUTE_RETRY_ON,
        num_retries=retry.get("numRetries", 2),
    )
    back_off = (retry.get("perRetry") or {}).get("backOff") or {}
    if back_off:
        base = parse_duration(back_off.get("baseInterval", "0s"))
        policy.retry_back_off = BackoffStrategy(
            base_interval=base,
            max_interval=parse_duration(back_off["maxInterval"]) if "maxInterval" in back_off else None,
        )
    return policy


def _is_fallback(target: BackendTarget) -> bool:
    return target.resource.kind == "Backend" and target.resource.spec.get("fallback") is True


def _upstream_tls(tls: UpstreamTls) -> Any:
    """EG's UpstreamTlsContext: the SNI if any; unless verification is skipped, the CA bundle (or the system
    one) and the names the certificate must carry (the subjectAltNames, else the SNI)."""
    from envoy_data_plane.envoy.config.core.v3 import DataSource, TransportSocket
    from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
        CertificateValidationContext,
        CommonTlsContext,
        SubjectAltNameMatcher,
        SubjectAltNameMatcherSanType,
        UpstreamTlsContext,
    )
    from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher

    common = CommonTlsContext()
    if not tls.skip_verify:
        kinds = {"DNS": SubjectAltNameMatcherSanType.DNS, "URI": SubjectAltNameMatcherSanType.URI}
        trusted = DataSource(inline_string=tls.ca) if tls.ca is not None else DataSource(filename=SYSTEM_CA_BUNDLE)
        common.validation_context = CertificateValidationContext(
            trusted_ca=trusted,
            match_typed_subject_alt_names=[
                SubjectAltNameMatcher(san_type=kinds[kind], matcher=StringMatcher(exact=name))
                for kind, name in tls.san_names
            ],
        )
    context = UpstreamTlsContext(common_tls_context=common)
    if tls.sni is not None:
        context.sni = tls.sni
    elif not tls.skip_verify and not tls.san_names:
        context.auto_sni_san_validation = True  # the SNI Envoy takes from the request's host (cluster's auto_sni)
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(context))


def _endpoints(target: BackendTarget, options: RenderOptions, owner: str) -> list[Any]:
    from envoy_data_plane.envoy.config.endpoint.v3 import Endpoint, LbEndpoint

    backend = target.resource
    if backend.kind == "Service":
        found = service_address(backend)
        if found is None or target.port is None:
            raise ConfigError(
                f"{owner}: Service {backend.namespace}/{backend.name} has no spec.clusterIP: unsupported outside "
                "Kubernetes (its endpoints would come from EndpointSlices); give it a clusterIP, or reference "
                "a Backend (group gateway.envoyproxy.io)"
            )
        return [LbEndpoint(endpoint=Endpoint(address=address(found[1], target.port)))]
    sidecar = options.sidecar
    if sidecar is not None and sidecar.is_sidecar(backend):
        return [LbEndpoint(endpoint=Endpoint(address=pipe_address(str(s)))) for s in sidecar.sockets]
    result = []
    for endpoint in backend.spec["endpoints"]:
        if endpoint.get("ip"):
            addr = address(endpoint["ip"]["address"], endpoint["ip"]["port"])
        elif endpoint.get("fqdn"):
            addr = address(endpoint["fqdn"]["hostname"], endpoint["fqdn"]["port"])
        else:
            addr = pipe_address(endpoint["unix"]["path"])
        result.append(LbEndpoint(endpoint=Endpoint(address=addr)))
    return result


def _dns_resolver(host: str, port: int) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import TypedExtensionConfig
    from envoy_data_plane.envoy.extensions.network.dns_resolver.cares.v3 import CaresDnsResolverConfig

    return TypedExtensionConfig(
        name="envoy.network.dns_resolver.cares",
        typed_config=pack(CaresDnsResolverConfig(resolvers=[address(host, port)])),
    )


def build_cluster(
    name: str,
    targets: Sequence[BackendTarget],
    resources: ResourceSet,
    options: RenderOptions,
    *,
    owner: str,
    grpc: bool = False,
    lb: LoadBalancing | None = None,
) -> Any:
    """The cluster for one rule (or extProc entry). `owner` prefixes errors (`FILE: Kind/ns/name: field`)."""
    from envoy_data_plane.envoy.config.cluster.v3 import (
        Cluster,
        ClusterCommonLbConfig,
        ClusterCommonLbConfigLocalityWeightedLbConfig,
        ClusterDiscoveryType,
        ClusterDnsLookupFamily,
        ClusterLbPolicy,
        ClusterMaglevLbConfig,
    )
    from envoy_data_plane.envoy.config.core.v3 import (
        Http1ProtocolOptions,
        Http2ProtocolOptions,
        Locality,
        UpstreamHttpProtocolOptions,
    )
    from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, LocalityLbEndpoints
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )

    lb = lb or LoadBalancing()
    live = [t for t in targets if t.weight > 0]
    localities = []
    for index, target in enumerate(live):
        endpoints = _endpoints(target, options, owner)
        if lb.consistent:
            # Maglev ignores locality weights; carry the backendRef weight on each endpoint instead.
            for endpoint in endpoints:
                endpoint.load_balancing_weight = target.weight
        localities.append(
            LocalityLbEndpoints(
                locality=Locality(region=f"{name}/backend/{index}"),
                lb_endpoints=endpoints,
                load_balancing_weight=None if lb.consistent else target.weight,
                # EG's fallback Backend: priority 1, served only while the priority-0 hosts are unhealthy
                # (below 72% with Envoy's default overprovisioning factor of 1.4).
                priority=1 if _is_fallback(target) else 0,
            )
        )
    backends = [t.resource for t in live]
    dns = any("fqdn" in endpoint_kinds(t) for t in live)
    discovery = ClusterDiscoveryType.STRICT_DNS if dns else ClusterDiscoveryType.STATIC
    logical = [b for b in backends if str(b.annotations.get(DNS_ANNOTATION, "")).lower() == "logical"]
    if logical:
        if sum(len(loc.lb_endpoints) for loc in localities) != 1 or not dns:
            raise ConfigError(
                f"{owner}: Backend {logical[0].name}: annotation {DNS_ANNOTATION}: logical needs a "
                "rule (or extProc) whose only endpoint is one fqdn endpoint"
            )
        discovery = ClusterDiscoveryType.LOGICAL_DNS
    cluster = Cluster(
        name=name,
        type=discovery,
        connect_timeout=datetime.timedelta(seconds=10),
        per_connection_buffer_limit_bytes=32768,
        lb_policy={
            "RoundRobin": ClusterLbPolicy.ROUND_ROBIN,
            "LeastRequest": ClusterLbPolicy.LEAST_REQUEST,
            "Random": ClusterLbPolicy.RANDOM,
            "ConsistentHash": ClusterLbPolicy.MAGLEV,
        }[lb.type],
        load_assignment=ClusterLoadAssignment(cluster_name=name, endpoints=localities),
    )
    if lb.consistent and lb.table_size is not None:
        cluster.maglev_lb_config = ClusterMaglevLbConfig(table_size=lb.table_size)
    if not lb.consistent:
        cluster.common_lb_config = ClusterCommonLbConfig(
            locality_weighted_lb_config=ClusterCommonLbConfigLocalityWeightedLbConfig()
        )
    if dns:
        cluster.dns_lookup_family = ClusterDnsLookupFamily.V4_PREFERRED  # EG's choice
    if dns and options.dns_resolver is not None:
        cluster.typed_dns_resolver_config = _dns_resolver(*options.dns_resolver)
    h2 = grpc or any(H2C in (b.spec.get("appProtocols") or []) for b in backends if b.kind == "Backend")
    settings = {upstream_tls(resources, t) for t in live}  # raises TlsProblem (a ConfigError) when unusable
    with_tls = [tls for tls in settings if tls is not None]
    if with_tls and len(settings) > 1:
        raise ConfigError(f"{owner}: backends of one cluster need the same upstream TLS (found {len(settings)})")
    tls = with_tls[0] if with_tls else None
    # EG's auto SNI: TLS without a literal SNI takes the request's host as SNI (and, verifying, as the name
    # the certificate must carry: _upstream_tls), so any certificate of the CA does not do for every host.
    auto_sni = tls is not None and tls.sni is None
    if h2 or auto_sni:
        explicit = (
            HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
            if h2
            else HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions())
        )
        protocol = HttpProtocolOptions(explicit_http_config=explicit)
        if auto_sni:
            protocol.upstream_http_protocol_options = UpstreamHttpProtocolOptions(auto_sni=True)
        options_name = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        cluster.typed_extension_protocol_options = {options_name: pack(protocol)}
    if tls is not None:
        cluster.transport_socket = _upstream_tls(tls)
    sidecar = options.sidecar
    if grpc and sidecar is not None and any(sidecar.is_sidecar(b) for b in backends):
        route_around_failed_workers(cluster, len(sidecar.sockets))
    return cluster
