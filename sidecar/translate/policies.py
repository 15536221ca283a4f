"""EG policies as Envoy config: ext_proc and wasm filters, RBAC, load balancing (client IP detection: clientip.py).

One section per policy feature, each turning the policy already found to be in force into Envoy
messages. Which policy is in force is attachment, in refs.py (as EG: a policy targets a Gateway,
optionally one listener via sectionName, or an HTTPRoute; for one Envoy route the most specific policy of
a kind wins, route > listener > Gateway, and the others do not apply there). Filters that a policy adds
exist once in the listener's filter chain, `disabled: true`, and are switched on per route (EG's
placement, done by routes.py); RBAC is one filter with the rules in each route's RBACPerRoute.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from sidecar.chains import Chain
from sidecar.errors import ConfigError
from sidecar.translate.backends import (
    LoadBalancing,
    apply_backend_settings,
    backend_retry_policy,
    build_cluster,
    sidecar_retry_policy,
)
from sidecar.translate.messages import pack, parse_duration
from sidecar.translate.options import CHAIN_ANNOTATION, RenderOptions
from sidecar.translate.refs import backend_ref_target, pull_secrets
from sidecar.translate.resources import Resource, ResourceSet
from sidecar.wire import CHAIN_METADATA_KEY

__all__ = [
    "PolicyFilter",
    "ext_proc_filters",
    "load_balancing",
    "rbac_filter",
    "rbac_per_route",
    "wasm_filters",
]

EXT_PROC = "envoy.filters.http.ext_proc"
WASM = "envoy.filters.http.wasm"
RBAC = "envoy.filters.http.rbac"


@dataclass
class PolicyFilter:
    """One HTTP filter a policy contributes: its HCM entry (disabled) and, for ext_proc, its cluster."""

    name: str
    filter: Any
    cluster: Any | None = None


# ---- ext_proc -------------------------------------------------------------------------------------

_BODY_MODES = {
    "Streamed": "STREAMED",
    "Buffered": "BUFFERED",
    "BufferedPartial": "BUFFERED_PARTIAL",
    "FullDuplexStreamed": "FULL_DUPLEX_STREAMED",
}


def _processing_mode(mode: dict[str, Any]) -> Any:
    """EG's mapping: everything SKIP/NONE unless configured; a configured direction sends its headers."""
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
        ProcessingMode,
        ProcessingModeBodySendMode,
        ProcessingModeHeaderSendMode,
    )

    send, skip = ProcessingModeHeaderSendMode.SEND, ProcessingModeHeaderSendMode.SKIP
    result = ProcessingMode(
        request_header_mode=skip, response_header_mode=skip, request_trailer_mode=skip, response_trailer_mode=skip
    )
    for direction in ("request", "response"):
        settings = mode.get(direction)
        if settings is None:
            continue
        setattr(result, f"{direction}_header_mode", send)
        body = settings.get("body")
        if body is not None:
            setattr(result, f"{direction}_body_mode", ProcessingModeBodySendMode[_BODY_MODES[body]])
            if body == "FullDuplexStreamed":
                setattr(result, f"{direction}_trailer_mode", send)
    return result


def _sidecar_fail_open(policy: Resource, ext: dict[str, Any], where: str, chain: Chain) -> bool:
    """Envoy's failure_mode_allow for an extProc entry that calls the sidecar: the chain's own policy.

    A fail_open chain fails open on timeouts and an unreachable sidecar too (unless failOpen: false asks
    for less); failOpen: true on a fail_closed chain would let its traffic through unprocessed, so it is
    refused rather than obeyed.
    """
    if ext.get("failOpen") and not chain.fail_open:
        raise policy.error(
            where,
            f"true would let requests through unprocessed when sidecar chain {chain.name!r} "
            "(on_error: fail_closed) times out or the sidecar is unreachable; set on_error: fail_open "
            "on the chain, or drop failOpen",
        )
    return bool(ext.get("failOpen", chain.fail_open))


def ext_proc_filters(resources: ResourceSet, policy: Resource, options: RenderOptions) -> list[PolicyFilter]:
    from envoy_data_plane.envoy.config.core.v3 import GrpcService, GrpcServiceEnvoyGrpc, HeaderValue
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
        ExternalProcessor,
        MetadataOptions,
        MetadataOptionsMetadataNamespaces,
        ProcessingMode,
    )
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
    from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode

    result = []
    for index, ext in enumerate(policy.spec.get("extProc") or []):
        path = f"spec.extProc[{index}]"
        ir_name = f"envoyextensionpolicy/{policy.namespace}/{policy.name}/extproc/{index}"
        refs = ext["backendRefs"]
        targets = [backend_ref_target(resources, policy, ref, f"{path}.backendRefs[{i}]") for i, ref in enumerate(refs)]
        cluster = build_cluster(ir_name, targets, resources, options, owner=policy.where(path), grpc=True)
        first = targets[0].resource
        authority = f"{first.name}.{first.namespace}" + (f":{targets[0].port}" if targets[0].port else "")
        grpc = GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=ir_name, authority=authority),
            timeout=datetime.timedelta(seconds=10),
        )
        mode_spec = ext.get("processingMode")
        sidecar = options.sidecar
        is_sidecar = sidecar is not None and any(sidecar.is_sidecar(t.resource) for t in targets)
        fail_open = bool(ext.get("failOpen", False))
        chain: Chain | None = None
        if is_sidecar:
            assert sidecar is not None
            chain_name = policy.annotations.get(CHAIN_ANNOTATION)
            chain = sidecar.registry.chain(chain_name)
            if chain is None:
                chains = ", ".join(sorted(sidecar.registry.chains))
                raise policy.error(
                    f"metadata.annotations.{CHAIN_ANNOTATION}",
                    f"no sidecar chain named {chain_name!r} (chains: {chains})",
                )
            fail_open = _sidecar_fail_open(policy, ext, f"{path}.failOpen", chain)
            if "backendSettings" in ext:
                # `render --format eg` writes these for the sidecar under EG; here they are built in.
                raise policy.error(
                    f"{path}.backendSettings",
                    "unsupported field for this sidecar's Backend: `sidecar render` builds its health checks, "
                    "ejection and retries in (docs/reliability.md); drop backendSettings",
                )
            # A worker that died or stalled: open the stream again on another one (see backends.py).
            grpc.retry_policy = sidecar_retry_policy()
        elif "backendSettings" in ext:
            settings = ext["backendSettings"]
            apply_backend_settings(cluster, settings)
            if settings.get("retry") is not None:
                grpc.retry_policy = backend_retry_policy(settings["retry"])
        if mode_spec is None and chain is not None:
            mode = ProcessingMode.FromString(chain.mode.SerializeToString())
            if chain_name is not None:
                grpc.initial_metadata = [HeaderValue(key=CHAIN_METADATA_KEY, value=chain.name)]
        else:
            mode = _processing_mode(mode_spec or {})
        processor = ExternalProcessor(
            grpc_service=grpc,
            failure_mode_allow=fail_open,
            processing_mode=mode,
            allow_mode_override=bool((mode_spec or {}).get("allowModeOverride", is_sidecar)),
        )
        if ext.get("shadowMode"):
            processor.observability_mode = True
        if "statusOnError" in ext:
            processor.status_on_error = HttpStatus(code=StatusCode(ext["statusOnError"]))
        if "messageTimeout" in ext:
            processor.message_timeout = parse_duration(ext["messageTimeout"])
        elif is_sidecar:
            assert sidecar is not None
            processor.message_timeout = datetime.timedelta(seconds=sidecar.message_timeout)
        for direction in ("request", "response"):
            attributes = list(((mode_spec or {}).get(direction) or {}).get("attributes") or ())
            if chain is not None:  # and what the chain's plugins declared they read
                attributes += [a for a in getattr(chain, f"{direction}_attributes") if a not in attributes]
            if attributes:
                setattr(processor, f"{direction}_attributes", attributes)
        metadata = dict(ext.get("metadata") or {})
        if chain is not None:
            # Plugins write metadata in the sidecar's namespace and the ones they declared, and read the ones
            # they declared (as `sidecar envoy-config` sets up): Envoy drops or withholds any other.
            for field, declared in (
                ("writableNamespaces", chain.metadata_namespaces),
                ("accessibleNamespaces", chain.forwarding_namespaces),
            ):
                names = list(metadata.get(field) or ())
                metadata[field] = names + [n for n in declared if n not in names]
        if metadata:
            processor.metadata_options = MetadataOptions(
                forwarding_namespaces=MetadataOptionsMetadataNamespaces(
                    untyped=list(metadata.get("accessibleNamespaces") or [])
                ),
                receiving_namespaces=MetadataOptionsMetadataNamespaces(
                    untyped=list(metadata.get("writableNamespaces") or [])
                ),
            )
        name = f"{EXT_PROC}/{ir_name}"
        result.append(PolicyFilter(name, HttpFilter(name=name, disabled=True, typed_config=pack(processor)), cluster))
    return result


# ---- wasm -----------------------------------------------------------------------------------------


def wasm_filters(resources: ResourceSet, policy: Resource, options: RenderOptions) -> list[PolicyFilter]:
    from envoy_data_plane.envoy.config.core.v3 import AsyncDataSource, DataSource
    from envoy_data_plane.envoy.extensions.filters.http.wasm.v3 import Wasm
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
    from envoy_data_plane.envoy.extensions.wasm.v3 import EnvironmentVariables, FailurePolicy, PluginConfig, VmConfig
    from envoy_data_plane.google.protobuf import StringValue

    result = []
    for index, wasm in enumerate(policy.spec.get("wasm") or []):
        path = f"spec.wasm[{index}]"
        ir_name = f"envoyextensionpolicy/{policy.namespace}/{policy.name}/wasm/{index}"
        if options.fetch_module is None:
            raise policy.error(f"{path}.code", "cannot fetch Wasm modules here (no fetcher configured)")
        try:
            code = options.fetch_module(wasm["code"], pull_secrets(resources, policy, wasm["code"]))
        except ConfigError as exc:
            raise policy.error(f"{path}.code", str(exc)) from None
        if "local" not in code:
            raise policy.error(f"{path}.code", "the fetcher returned no local file")
        vm = VmConfig(
            vm_id=ir_name,
            runtime="envoy.wasm.runtime.v8",
            code=AsyncDataSource(local=DataSource(filename=code["local"]["filename"])),
        )
        host_keys = (wasm.get("env") or {}).get("hostKeys")
        if host_keys:
            vm.environment_variables = EnvironmentVariables(host_env_keys=list(host_keys))
        # FAIL_OPEN is written out as EG's `fail_open: true` (messages.finish_per_filter_configs says why).
        policy_on_failure = FailurePolicy.FAIL_OPEN if wasm.get("failOpen") else FailurePolicy.FAIL_CLOSED
        plugin = PluginConfig(
            name=wasm.get("name", ir_name),
            root_id=wasm.get("rootID", ""),
            vm_config=vm,
            failure_policy=policy_on_failure,
        )
        if wasm.get("config") is not None:
            plugin.configuration = pack(StringValue(value=json.dumps(wasm["config"], sort_keys=True)))
        name = f"{WASM}/{ir_name}"
        result.append(PolicyFilter(name, HttpFilter(name=name, disabled=True, typed_config=pack(Wasm(config=plugin)))))
    return result


# ---- SecurityPolicy authorization -> RBAC ---------------------------------------------------------


def _cidr_principal(cidrs: list[str]) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import CidrRange
    from envoy_data_plane.envoy.config.rbac.v3 import Principal, PrincipalSet

    ids = []
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        ids.append(Principal(remote_ip=CidrRange(address_prefix=str(net.network_address), prefix_len=net.prefixlen)))
    return ids[0] if len(ids) == 1 else Principal(or_ids=PrincipalSet(ids=ids))


def rbac_per_route(policy: Resource) -> Any | None:
    """First-match rules over the client IP, as one ALLOW policy set (None: no authorization block).

    A request is allowed when the first rule it matches is an Allow rule, or it matches no rule and the
    default action is Allow. Rule i's policy is "matches i and none of the earlier Deny rules" (earlier
    Allow rules would have allowed it anyway); the default is "matches no Deny rule and no Allow rule".
    `remote_ip` is the client address after X-Forwarded-For/custom-header detection.
    """
    from envoy_data_plane.envoy.config.rbac.v3 import Permission, Policy, Principal, PrincipalSet, Rbac, RbacAction
    from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac as RbacFilter

    authorization = policy.spec.get("authorization")
    if authorization is None:
        return None
    rules = authorization.get("rules") or []
    matchers = [_cidr_principal(rule["principal"]["clientCIDRs"]) for rule in rules]
    policies: dict[str, Any] = {}
    for index, rule in enumerate(rules):
        if rule["action"] != "Allow":
            continue
        earlier_denies = [matchers[j] for j in range(index) if rules[j]["action"] == "Deny"]
        principal = matchers[index]
        if earlier_denies:
            principal = Principal(
                and_ids=PrincipalSet(
                    ids=[principal, Principal(not_id=Principal(or_ids=PrincipalSet(ids=earlier_denies)))]
                )
            )
        policies[f"{index:03d}-{rule.get('name', 'allow')}"] = Policy(
            permissions=[Permission(any=True)], principals=[principal]
        )
    if authorization.get("defaultAction", "Deny") == "Allow":
        principal = (
            Principal(any=True) if not matchers else Principal(not_id=Principal(or_ids=PrincipalSet(ids=matchers)))
        )
        policies["zzz-default-allow"] = Policy(permissions=[Permission(any=True)], principals=[principal])
    # envoy-data-plane 2.2 resolves RBACPerRoute.rbac to the wrong `Rbac` class and refuses the message,
    # so the filter config travels as is and messages.finish_per_filter_configs() wraps it once the bootstrap is a dict.
    return RbacFilter(rules=Rbac(action=RbacAction.ALLOW, policies=policies))


def rbac_filter() -> Any:
    """The listener-level RBAC filter: no rules (allows everything) unless a route's RBACPerRoute says otherwise."""
    from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac as RbacFilter
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter

    return HttpFilter(name=RBAC, typed_config=pack(RbacFilter()))


# ---- BackendTrafficPolicy loadBalancer ---------------------------------------------------------------


def load_balancing(policy: Resource | None) -> tuple[LoadBalancing, list[Any]]:
    """The cluster LB settings and the route hash policies for a BackendTrafficPolicy (or the default)."""
    from envoy_data_plane.envoy.config.route.v3 import (
        RouteActionHashPolicy,
        RouteActionHashPolicyConnectionProperties,
        RouteActionHashPolicyCookie,
        RouteActionHashPolicyCookieAttribute,
        RouteActionHashPolicyHeader,
    )

    lb = (policy.spec.get("loadBalancer") if policy else None) or {}
    if not lb:
        return LoadBalancing(), []
    consistent = lb.get("consistentHash")
    if consistent is None:
        return LoadBalancing(lb["type"]), []
    settings = LoadBalancing("ConsistentHash", consistent.get("tableSize"))
    kind = consistent["type"]
    if kind == "SourceIP":
        hash_policy = RouteActionHashPolicy(
            connection_properties=RouteActionHashPolicyConnectionProperties(source_ip=True)
        )
    elif kind == "Header":
        header = RouteActionHashPolicyHeader(header_name=consistent["header"]["name"])
        hash_policy = RouteActionHashPolicy(header=header)
    else:
        cookie = consistent["cookie"]
        spec = RouteActionHashPolicyCookie(name=cookie["name"])
        if "ttl" in cookie:
            spec.ttl = parse_duration(cookie["ttl"])
        spec.attributes = [
            RouteActionHashPolicyCookieAttribute(name=k, value=v)
            for k, v in sorted((cookie.get("attributes") or {}).items())
        ]
        hash_policy = RouteActionHashPolicy(cookie=spec)
    return settings, [hash_policy]
