"""Reference resolution: what each reference in the resources points at, for the rules and the builders.

Every cross-resource lookup of the translator is here, named for the reference it follows:

* backendRefs -> `BackendTarget` (the Backend or Service, port, weight); a Service's address outside
  Kubernetes (`service_address`) and the address kinds a target brings (`endpoint_kinds`);
* parentRefs -> which listeners of a Gateway a route attaches to (`listener_accepts`, `attached_routes`,
  `host_intersection`);
* policy targetRefs (`policy_targets`; which policy is in force is attachment.py, which BackendTLSPolicy
  backendtls.py); Gateway -> EnvoyProxy (`gateway_envoy_proxy`);
* Secrets and ConfigMaps -> their keys (`secret_value`, `secret_ref`, wasm pull Secrets; listener
  certificates are certificates.py).

Lookups that can fail raise ConfigError naming the owner's file, resource and field (rules.py calls them
first, so the builders, which run after validation, find everything resolved).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sidecar.translate.grants import reference_permitted
from sidecar.translate.resources import EG_API, GATEWAY_API, Resource, ResourceSet

__all__ = [
    "BackendTarget",
    "attached_routes",
    "backend_ref_target",
    "endpoint_kind",
    "endpoint_kinds",
    "gateway_envoy_proxy",
    "host_intersection",
    "listener_accepts",
    "policy_targets",
    "pull_secrets",
    "secret_ref",
    "secret_value",
    "service_address",
    "unreferenced_proxies",
]


# ---- backendRefs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendTarget:
    """A resolved backendRef: the Backend or Service, and the port (Services need one)."""

    resource: Resource
    port: int | None
    weight: int


def backend_ref_target(resources: ResourceSet, owner: Resource, ref: dict[str, Any], path: str) -> BackendTarget:
    """The Backend or Service a backendRef of `owner` (at field `path`) names; ConfigError if it does not resolve."""
    group = ref.get("group", "")
    kind = ref.get("kind", "Service")
    namespace = ref.get("namespace", owner.namespace)
    weight = int(ref.get("weight", 1))
    if (group, kind) == (EG_API, "Backend"):
        backend = resources.get("Backend", namespace, ref["name"])
        if backend is None:
            raise owner.error(f"{path}.name", f"no Backend {namespace}/{ref['name']} in the input files")
        target = BackendTarget(backend, ref.get("port"), weight)
    elif (group, kind) == ("", "Service"):
        service = resources.get("Service", namespace, ref["name"])
        if service is None:
            raise owner.error(
                f"{path}.name",
                f"no Service {namespace}/{ref['name']} in the input files "
                "(or use a Backend of group gateway.envoyproxy.io)",
            )
        port = ref.get("port")
        if port is None:
            raise owner.error(f"{path}.port", "required for a Service backendRef (a port of the Service)")
        ports = [p.get("port") for p in service.spec.get("ports") or []]
        if port not in ports:
            raise owner.error(
                f"{path}.port",
                f"Service {namespace}/{ref['name']} has no port {port} (ports: {', '.join(map(str, ports)) or 'none'})",
            )
        target = BackendTarget(service, port, weight)
    else:
        raise owner.error(
            path, f"expected a Backend (group {EG_API}) or a Service (group ''), got group {group!r} kind {kind!r}"
        )
    _require_grant(resources, owner, group, kind, namespace, ref["name"], path)
    return target


def _require_grant(
    resources: ResourceSet, owner: Resource, group: str, kind: str, namespace: str, name: str, path: str
) -> None:
    """ConfigError unless a ReferenceGrant allows `owner` to reference that object in another namespace."""
    if not reference_permitted(resources, owner, group, kind, namespace, name):
        raise owner.error(
            f"{path}.namespace",
            f"{kind} {namespace}/{name} is in another namespace and no ReferenceGrant in {namespace} allows "
            f"references to it from {owner.kind}s of namespace {owner.namespace} (EG: RefNotPermitted)",
        )


def endpoint_kind(endpoint: dict[str, Any]) -> str:
    """ip, fqdn or unix: the one a Backend endpoint sets."""
    return next(k for k in ("ip", "fqdn", "unix") if endpoint.get(k) is not None)


def service_address(service: Resource) -> tuple[str, str] | None:
    """("fqdn", name) for an ExternalName Service, ("ip", address) for one with a clusterIP, else None.

    That is how a Service runs outside Kubernetes: traffic goes to clusterIP:port (or the external
    name) directly; there are no pods behind it to pick a targetPort.
    """
    spec = service.spec
    if spec.get("type") == "ExternalName":
        return "fqdn", str(spec["externalName"])
    cluster_ip = spec.get("clusterIP")
    if isinstance(cluster_ip, str) and cluster_ip not in ("", "None"):
        return "ip", cluster_ip
    return None


def endpoint_kinds(target: BackendTarget) -> set[str]:
    """The address kinds a resolved backendRef contributes: ip, fqdn, unix, or "service" (no address)."""
    if target.resource.kind == "Service":
        found = service_address(target.resource)
        return {found[0] if found else "service"}
    return {endpoint_kind(e) for e in target.resource.spec["endpoints"]}


# ---- parentRefs: routes on listeners -------------------------------------------------------------


def host_intersection(route_host: str, listener_host: str | None) -> str | None:
    """The hostname a route serves on a listener (None: not on this listener), Gateway API intersection."""
    if listener_host is None or route_host == listener_host:
        return route_host
    if listener_host.startswith("*.") and route_host.endswith(listener_host[1:]):
        return route_host
    if route_host.startswith("*.") and listener_host.endswith(route_host[1:]):
        return listener_host
    return None


# The route kinds a listener of each protocol takes (EG's allowedRouteKindsForProtocol; TLS in Terminate
# mode, or none given, takes TCPRoutes and TLSRoutes, in Passthrough mode TLSRoutes only).
ROUTE_KINDS = {
    "HTTP": ("HTTPRoute", "GRPCRoute"),
    "HTTPS": ("HTTPRoute", "GRPCRoute"),
    "TLS": ("TCPRoute", "TLSRoute"),
    "TCP": ("TCPRoute",),
    "UDP": ("UDPRoute",),
}


def supported_route_kinds(listener: dict[str, Any]) -> list[str]:
    """The route kinds `listener` accepts, as EG lists them: its protocol's, narrowed to the ones its
    allowedRoutes.kinds names validly (group gateway.networking.k8s.io, a kind of the protocol)."""
    protocol_kinds = ROUTE_KINDS.get(listener["protocol"], ())
    if listener["protocol"] == "TLS" and (listener.get("tls") or {}).get("mode") == "Passthrough":
        protocol_kinds = ("TLSRoute",)
    wanted = (listener.get("allowedRoutes") or {}).get("kinds")
    if not wanted:
        return list(protocol_kinds)
    # A group left out (or null) is Gateway API's; "" is the core group, which has no route kinds.
    return [k["kind"] for k in wanted if k.get("group") in (None, GATEWAY_API) and k["kind"] in protocol_kinds]


def listener_accepts(gateway: Resource, listener: dict[str, Any], route: Resource, parent: dict[str, Any]) -> bool:
    """Whether `parent` (one of `route`'s parentRefs) attaches the route to this listener of `gateway`."""
    if parent["name"] != gateway.name or parent.get("namespace", route.namespace) != gateway.namespace:
        return False
    if parent.get("sectionName") not in (None, listener["name"]) or parent.get("port") not in (None, listener["port"]):
        return False
    if "HTTPRoute" not in supported_route_kinds(listener):
        return False  # EG: the listener's supported kinds (none for a protocol it does not know)
    allowed = ((listener.get("allowedRoutes") or {}).get("namespaces") or {}).get("from", "Same")
    if allowed == "Same" and route.namespace != gateway.namespace:
        return False  # Gateway API default: only routes from the Gateway's own namespace attach
    hostnames = route.spec.get("hostnames") or []
    return not hostnames or any(host_intersection(h, listener.get("hostname")) for h in hostnames)


def attached_routes(resources: ResourceSet, gateway: Resource, listener: str) -> list[Resource]:
    """The HTTPRoutes attached to `gateway`'s listener named `listener`, in input order."""
    spec = next(li for li in gateway.spec["listeners"] if li["name"] == listener)
    return [
        route
        for route in resources.of("HTTPRoute")
        if any(listener_accepts(gateway, spec, route, parent) for parent in route.spec.get("parentRefs") or [])
    ]


# ---- targetRefs: policy attachment ---------------------------------------------------------------


def policy_targets(res: Resource) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field path, targetRef) for `targetRef` or each of `targetRefs`."""
    if res.kind == "BackendTLSPolicy" or "targetRefs" in res.spec:
        for index, ref in enumerate(res.spec.get("targetRefs") or []):
            yield f"spec.targetRefs[{index}]", ref
    elif "targetRef" in res.spec:
        yield "spec.targetRef", res.spec["targetRef"]


# ---- Gateway -> EnvoyProxy -----------------------------------------------------------------------


def unreferenced_proxies(resources: ResourceSet) -> list[Resource]:
    """EnvoyProxies with a filterOrder that no Gateway's infrastructure.parametersRef names."""
    referenced = {
        (g.namespace, ((g.spec.get("infrastructure") or {}).get("parametersRef") or {}).get("name"))
        for g in resources.of("Gateway")
        if unresolved_parameters_ref(resources, g) is None
    }
    return [
        p for p in resources.of("EnvoyProxy") if p.spec.get("filterOrder") and (p.namespace, p.name) not in referenced
    ]


def gateway_envoy_proxy(resources: ResourceSet, gateway: Resource) -> Resource | None:
    """The EnvoyProxy whose settings apply to `gateway`: the one its parametersRef names, else the one
    with a filterOrder that no Gateway references (there is no GatewayClass outside Kubernetes to carry it).
    A parametersRef that names no EnvoyProxy falls back the same way, as in EG (contexts.go: the Gateway
    stays Accepted and gets the GatewayClass's settings, or the defaults)."""
    ref = (gateway.spec.get("infrastructure") or {}).get("parametersRef")
    if ref is not None and unresolved_parameters_ref(resources, gateway) is None:
        return resources.get("EnvoyProxy", gateway.namespace, ref["name"])
    unreferenced = unreferenced_proxies(resources)
    return unreferenced[0] if unreferenced else None


def unresolved_parameters_ref(resources: ResourceSet, gateway: Resource) -> str | None:
    """Why `gateway`'s infrastructure.parametersRef names no EnvoyProxy, or None (also without one)."""
    ref = (gateway.spec.get("infrastructure") or {}).get("parametersRef")
    if ref is None:
        return None
    if (ref["group"], ref["kind"]) != (EG_API, "EnvoyProxy"):
        return f"expected group {EG_API} kind EnvoyProxy, got {ref['group']}/{ref['kind']}"
    if resources.get("EnvoyProxy", gateway.namespace, ref["name"]) is None:
        return f"no EnvoyProxy {gateway.namespace}/{ref['name']} in the input files"
    return None


# ---- Secrets and ConfigMaps ----------------------------------------------------------------------


def secret_value(res: Resource, key: str) -> bytes | None:
    """`key` from a Secret or ConfigMap: `stringData`/ConfigMap `data` as text, Secret `data` base64."""
    string_data = res.data.get("stringData") or {}
    data = res.data.get("data") or {}
    if key in string_data:
        return str(string_data[key]).encode()
    if key not in data:
        return None
    if res.kind == "ConfigMap":
        return str(data[key]).encode()
    try:
        return base64.b64decode(data[key], validate=True)
    except (binascii.Error, ValueError):
        raise res.error(f"data.{key}", "expected base64 (use stringData for plain text)") from None


def secret_ref(
    resources: ResourceSet, owner: Resource, ref: dict[str, Any], path: str, keys: tuple[str, ...]
) -> Resource:
    """The Secret or ConfigMap `ref` names (from `owner` at field `path`), holding every one of `keys`."""
    kind = ref.get("kind", "Secret")
    if ref.get("group", "") != "" or kind not in ("Secret", "ConfigMap"):
        raise owner.error(path, f"expected a core Secret or ConfigMap, got {ref.get('group', '')}/{kind}")
    namespace = ref.get("namespace", owner.namespace)
    _require_grant(resources, owner, "", kind, namespace, ref["name"], path)
    found = resources.get(kind, namespace, ref["name"])
    if found is None:
        raise owner.error(f"{path}.name", f"no {kind} {namespace}/{ref['name']} in the input files")
    for key in keys:
        if secret_value(found, key) is None:
            raise owner.error(f"{path}.name", f"{kind} {namespace}/{ref['name']} has no key {key!r}")
    return found


def pull_secrets(resources: ResourceSet, policy: Resource, code: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pull Secret a wasm image names (in another namespace only with a ReferenceGrant: rules.py checks)."""
    ref = (code.get("image") or {}).get("pullSecretRef")
    if not ref:
        return {}
    secret = resources.get("Secret", ref.get("namespace", policy.namespace), ref["name"])
    return {ref["name"]: secret.data} if secret is not None else {}
