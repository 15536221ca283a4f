"""An HTTPRoute's backendRefs as EG resolves them: a backend to route to, or a share that answers 500.

EG keeps a route whose backendRefs do not all resolve (Accepted=True, ResolvedRefs=False) and answers 500
for the share of traffic the unresolved ones carry; it never routes that share elsewhere, and never
sends it without the TLS a BackendTLSPolicy asks for. The checks, in EG's order (v1.9.0 validate.go), each
with the ResolvedRefs reason EG reports:

* group: "", multicluster.x-k8s.io or gateway.envoyproxy.io; kind: Service, ServiceImport or Backend
  (InvalidKind). The kind decides what is looked up;
* a backendRef into another namespace needs a ReferenceGrant there allowing HTTPRoutes of the route's
  namespace (RefNotPermitted);
* a Service needs a port (PortNotSpecified), must exist (BackendNotFound), must not be ExternalName
  (UnsupportedValue: EG asks for a Backend with an fqdn endpoint instead) and must have that TCP port
  (PortNotFound);
* a Backend must exist (BackendNotFound) and may not hold unix socket endpoints (UnsupportedAddressType:
  only ext_proc and the like may reach a socket);
* the BackendTLSPolicy that applies to the backendRef must have a usable CA (InvalidBackendTLS).

A backendRef of weight 0 carries no traffic either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.translate.backendtls import TlsProblem, upstream_tls
from sidecar.translate.grants import reference_permitted
from sidecar.translate.refs import BackendTarget, endpoint_kind
from sidecar.translate.resources import EG_API, Resource, ResourceSet

__all__ = ["MULTICLUSTER_API", "Unresolved", "first_unresolved_reason", "resolve_route_ref", "rule_backends"]

MULTICLUSTER_API = "multicluster.x-k8s.io"


@dataclass(frozen=True)
class Unresolved:
    """A backendRef EG cannot resolve: its share of the rule's traffic answers 500."""

    index: int
    weight: int
    reason: str  # EG's ResolvedRefs reason
    message: str


def resolve_route_ref(
    resources: ResourceSet, route: Resource, ref: dict[str, Any], index: int
) -> BackendTarget | Unresolved:
    group = ref.get("group", "")
    kind = ref.get("kind", "Service")
    namespace = ref.get("namespace", route.namespace)
    weight = int(ref.get("weight", 1))
    name = ref["name"]

    def unresolved(reason: str, message: str) -> Unresolved:
        return Unresolved(index, weight, reason, message)

    if group not in ("", MULTICLUSTER_API, EG_API) or kind not in ("Service", "ServiceImport", "Backend"):
        return unresolved("InvalidKind", f"group {group!r} kind {kind!r}: expected a Service or a Backend")
    if not reference_permitted(resources, route, group, kind, namespace, name):
        return unresolved(
            "RefNotPermitted",
            f"{kind} {namespace}/{name} is in another namespace and no ReferenceGrant there allows it "
            f"from HTTPRoutes of namespace {route.namespace}",
        )
    if kind == "Service":
        port = ref.get("port")
        if port is None:
            return unresolved("PortNotSpecified", "a Service backendRef needs a port")
        service = resources.get("Service", namespace, name)
        if service is None:
            return unresolved("BackendNotFound", f"Service {namespace}/{name} not found")
        if service.spec.get("type") == "ExternalName":
            return unresolved(
                "UnsupportedValue",
                f"Service {namespace}/{name} is of type ExternalName, which EG does not route to "
                "(use a Backend with an fqdn endpoint)",
            )
        ports = [p for p in service.spec.get("ports") or [] if p.get("protocol", "TCP") == "TCP"]
        if port not in [p.get("port") for p in ports]:
            return unresolved("PortNotFound", f"TCP port {port} not found on Service {namespace}/{name}")
        target = BackendTarget(service, port, weight)
    elif kind == "Backend":
        backend = resources.get("Backend", namespace, name)
        if backend is None:
            return unresolved("BackendNotFound", f"Backend {namespace}/{name} not found")
        if any(endpoint_kind(e) == "unix" for e in backend.spec.get("endpoints") or []):
            return unresolved(
                "UnsupportedAddressType",
                f"Backend {namespace}/{name}: unix domain sockets are not supported in route backendRefs",
            )
        target = BackendTarget(backend, ref.get("port"), weight)
    else:
        return unresolved(
            "BackendNotFound", f"ServiceImport {namespace}/{name} not found (ServiceImports are not loaded)"
        )
    try:
        upstream_tls(resources, target)
    except TlsProblem as problem:
        owner = problem.policy
        return unresolved("InvalidBackendTLS", f"{owner.kind} {owner.namespace}/{owner.name}: {problem.message}")
    return target


def rule_backends(
    resources: ResourceSet, route: Resource, rule: dict[str, Any]
) -> tuple[list[BackendTarget], list[Unresolved]]:
    """The rule's resolved backendRefs and the unresolved ones, weight 0 left out of both."""
    resolved: list[BackendTarget] = []
    unresolved: list[Unresolved] = []
    for index, ref in enumerate(rule.get("backendRefs") or []):
        found = resolve_route_ref(resources, route, ref, index)
        if found.weight == 0:
            continue
        (unresolved if isinstance(found, Unresolved) else resolved).append(found)  # type: ignore[arg-type]
    return resolved, unresolved


def first_unresolved_reason(resources: ResourceSet, route: Resource) -> str:
    """EG's ResolvedRefs reason for `route` ("" when every backendRef resolves)."""
    for rule in route.spec.get("rules") or []:
        for index, ref in enumerate(rule.get("backendRefs") or []):
            found = resolve_route_ref(resources, route, ref, index)
            if isinstance(found, Unresolved):
                return found.reason
    return ""
