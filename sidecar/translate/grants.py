"""ReferenceGrants: whether a reference into another namespace is allowed, as Gateway API and EG decide it.

A reference from a resource in one namespace to an object in another needs a ReferenceGrant living in
the *target's* namespace that lists the referrer in `spec.from` (group, kind and namespace, all three
exact) and the target in `spec.to` (group and kind exact; a `name` narrows it to one object, an empty or
missing one allows every object of that kind). A reference within one namespace needs no grant. Without
a grant EG refuses the reference with RefNotPermitted; what that does to the referrer (a route share
answering 500, a listener without that certificate, a policy not accepted) is decided where the
reference is followed.
"""

from __future__ import annotations

from sidecar.translate.resources import KINDS, Resource, ResourceSet

__all__ = ["reference_permitted"]


def reference_permitted(
    resources: ResourceSet, owner: Resource, group: str, kind: str, namespace: str, name: str
) -> bool:
    """Whether `owner` may reference the object (group, kind, namespace, name)."""
    if namespace == owner.namespace:
        return True
    owner_group = KINDS[owner.kind]
    for grant in resources.of("ReferenceGrant"):
        if grant.namespace != namespace:
            continue
        spec = grant.spec
        if not any(
            (src.get("group", ""), src.get("kind"), src.get("namespace")) == (owner_group, owner.kind, owner.namespace)
            for src in spec.get("from") or []
        ):
            continue
        for dst in spec.get("to") or []:
            if (dst.get("group", ""), dst.get("kind")) == (group, kind) and dst.get("name") in (None, "", name):
                return True
    return False
