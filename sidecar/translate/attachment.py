"""Policy attachment as EG decides it: age order, conflicts between policies of a kind, precedence.

EG processes the policies of one kind oldest first (creationTimestamp; see age_order for ties). A policy aimed
at a target (and section) that an older policy of the same kind already claims is *Conflicted*: EG rejects
it and keeps the older one. A route-level policy and a Gateway-level one are not in conflict: on each
route the most specific applies (a route rule's section, the route, a listener's section, the Gateway).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from sidecar.translate.refs import policy_targets
from sidecar.translate.resources import Resource, ResourceSet

__all__ = ["CLAIMING_KINDS", "age_order", "attached_policy", "client_traffic_policy", "conflicts", "creation_time"]


def creation_time(res: Resource) -> str:
    """The resource's creationTimestamp (RFC 3339 sorts as text); "" when it has none (the oldest)."""
    meta = res.data.get("metadata") or {}
    value: Any = meta.get("creationTimestamp") if isinstance(meta, dict) else None
    if isinstance(value, datetime.datetime):  # YAML reads an unquoted timestamp as a datetime
        value = value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value) if value else ""


def age_order(resources: Iterable[Resource]) -> list[Resource]:
    """Oldest first: the order in which EG lets policies claim their targets.

    Ties (no creationTimestamp, as in files outside a cluster) keep input order: the resource written first
    is the older one. That is how EG's own translator decides its test corpus; a cluster's EG breaks ties
    of equal timestamps by namespace/name, but applied from one file, resources get their timestamps in
    file order anyway.
    """
    return sorted(resources, key=creation_time)  # stable: ties keep input order


# The policy kinds whose targets EG claims one policy at a time (a second one is Conflicted).
CLAIMING_KINDS = ("BackendTrafficPolicy", "ClientTrafficPolicy", "EnvoyExtensionPolicy", "SecurityPolicy")


def conflicts(policies: Iterable[Resource]) -> dict[tuple[str, str, str], tuple[str, Resource]]:
    """{policy key: (targetRef path, the older policy that holds that target)} for policies of one kind.

    A target is a Gateway, one of its listeners (sectionName), an HTTPRoute or one of its rules (sectionName);
    each can be held by one policy of a kind. Oldest first claims it; a policy may hold some targets and be
    Conflicted on another (EG reports it Conflicted for that ancestor).
    """
    held: dict[tuple[str, str, str, str | None], Resource] = {}
    found: dict[tuple[str, str, str], tuple[str, Resource]] = {}
    for policy in age_order(policies):
        for path, ref in policy_targets(policy):
            key = (str(ref.get("kind")), policy.namespace, str(ref.get("name")), ref.get("sectionName"))
            older = held.get(key)
            if older is None:
                held[key] = policy
            elif older.key != policy.key and policy.key not in found:
                found[policy.key] = (path, older)
    return found


def attached_policy(
    resources: ResourceSet,
    kind: str,
    route: Resource | None,
    gateway: Resource,
    listener: str,
    rule: str | None = None,
) -> Resource | None:
    """The `kind` policy in force for `route` (its rule named `rule`) on `gateway`'s `listener`.

    The most specific wins, as in EG: the route rule (a targetRef sectionName naming the rule), the route, the
    listener (a Gateway targetRef with that sectionName), the Gateway. Conflicted policies never get here:
    `rules.validate` refuses them (and in age order the older would win a tie anyway).
    """
    best: tuple[int, Resource] | None = None
    for policy in age_order(resources.of(kind)):
        for _, ref in policy_targets(policy):
            section = ref.get("sectionName")
            if ref["kind"] == "HTTPRoute":
                if route is None or (policy.namespace, ref["name"]) != (route.namespace, route.name):
                    continue
                if section and section != rule:
                    continue
                rank = 4 if section else 3
            elif ref["kind"] == "Gateway" and (policy.namespace, ref["name"]) == (gateway.namespace, gateway.name):
                if section and section != listener:
                    continue
                rank = 2 if section else 1
            else:
                continue
            if best is None or rank > best[0]:
                best = (rank, policy)
    return best[1] if best else None


def client_traffic_policy(
    resources: ResourceSet, gateway: Resource, listeners: list[dict[str, Any]]
) -> Resource | None:
    """The ClientTrafficPolicy for one HCM serving `listeners` of `gateway`: the first listener's in force."""
    for listener in listeners:
        found = attached_policy(resources, "ClientTrafficPolicy", None, gateway, listener["name"])
        if found is not None:
            return found
    return None
