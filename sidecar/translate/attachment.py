"""Policy attachment as EG decides it: age order, conflicts between policies of a kind, precedence.

EG processes the policies of one kind oldest first (creationTimestamp, then namespace/name). A policy aimed
at a target (and section) that an older policy of the same kind already claims is *Conflicted*: EG rejects
it and keeps the older one. A route-level policy and a Gateway-level one are not in conflict: on each
route the most specific applies (a route rule's section, the route, a listener's section, the Gateway).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from sidecar.translate.resources import Resource

__all__ = ["age_order", "creation_time"]


def creation_time(res: Resource) -> str:
    """The resource's creationTimestamp (RFC 3339 sorts as text); "" when it has none (the oldest)."""
    meta = res.data.get("metadata") or {}
    value: Any = meta.get("creationTimestamp") if isinstance(meta, dict) else None
    if isinstance(value, datetime.datetime):  # YAML reads an unquoted timestamp as a datetime
        value = value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value) if value else ""


def age_order(resources: Iterable[Resource]) -> list[Resource]:
    """Oldest first, then namespace/name: the order in which EG lets policies claim their targets."""
    return sorted(resources, key=lambda r: (creation_time(r), r.namespace, r.name))
