"""BackendTLSPolicy resolution, EG's rules: which policy applies to a backendRef, and the CA it trusts.

* **Which policy.** A backendRef is a target with a section: for a Service the *name* of the Service port
  it uses, for a Backend the port number. A policy whose targetRef names that section wins; otherwise one
  whose targetRef has no sectionName (it covers every port); a policy sectioned for another port does not
  apply. Among equals, the older policy (attachment.age_order).
  Policies live in the target's namespace. Group and kind must match ("" or none and Service, or
  gateway.envoyproxy.io and Backend).
* **The CA.** Each of `validation.caCertificateRefs` is a ConfigMap or Secret in the policy's namespace;
  its certificate is the key `ca.crt`, else `tls.crt`, else its only key. Bundles of several refs are
  joined. A ref of another kind, a missing object, an object without such a key, or nothing found at all
  makes the policy unusable: EG then sets Accepted=False (NoValidCACertificate) with ResolvedRefs=False
  (InvalidCACertificateRef, or InvalidKind when no ref had a supported kind), and every route share
  sent to that backend answers 500: never plain text. `wellKnownCACertificates: System` uses the
  system bundle.
* **Conflicts.** A second policy aimed at the same target and section as an older one is Conflicted;
  it is not applied.
"""

from __future__ import annotations

from typing import Any

from sidecar.errors import ConfigError
from sidecar.translate.attachment import age_order
from sidecar.translate.refs import BackendTarget, secret_value
from sidecar.translate.resources import EG_API, Resource, ResourceSet

__all__ = [
    "CA_KEYS",
    "TlsProblem",
    "ca_bundle",
    "conflicted_tls_policies",
    "target_section",
    "tls_policy",
    "tls_policy_verdicts",
]

CA_KEYS = ("ca.crt", "tls.crt")


class TlsProblem(ConfigError):
    """Why a BackendTLSPolicy cannot be used, with EG's reasons for its Accepted and ResolvedRefs."""

    def __init__(self, policy: Resource, message: str, resolved_reason: str = "InvalidCACertificateRef") -> None:
        super().__init__(f"{policy.where('spec.validation.caCertificateRefs')}: {message}")
        self.policy = policy
        self.message = message
        self.reason = "NoValidCACertificate"
        self.resolved_reason = resolved_reason


def target_section(target: BackendTarget) -> str | None:
    """The section a backendRef targets: a Service's port name, a Backend's port number."""
    if target.port is None:
        return None
    if target.resource.kind == "Backend":
        return str(target.port)
    for port in target.resource.spec.get("ports") or []:
        if port.get("port") == target.port and port.get("name"):
            return str(port["name"])
    return None


def _group(kind: str) -> str:
    return EG_API if kind == "Backend" else ""


def _sections(policy: Resource, backend: Resource) -> list[str | None]:
    """The sectionNames with which `policy` targets `backend` (None: the whole backend)."""
    if policy.namespace != backend.namespace:
        return []
    return [
        ref.get("sectionName")
        for ref in policy.spec.get("targetRefs") or []
        if (ref.get("group", ""), ref.get("kind"), ref.get("name"))
        == (_group(backend.kind), backend.kind, backend.name)
    ]


def _clashes(resources: ResourceSet) -> dict[tuple[tuple[str, str, str], tuple[object, ...]], Resource]:
    """{(policy key, target): the older policy that holds that target}: same namespace, target and section.

    Per target, not per policy: a policy that clashes on one target still applies to its others (dropping
    it everywhere would send those backends plain text)."""
    holders: dict[tuple[object, ...], Resource] = {}
    clashes: dict[tuple[tuple[str, str, str], tuple[object, ...]], Resource] = {}
    for policy in age_order(resources.of("BackendTLSPolicy")):
        for ref in policy.spec.get("targetRefs") or []:
            target = (policy.namespace, ref.get("group", ""), ref.get("kind"), ref.get("name"), ref.get("sectionName"))
            older = holders.setdefault(target, policy)
            if older is not policy:
                clashes[(policy.key, target)] = older
    return clashes


def conflicted_tls_policies(resources: ResourceSet) -> dict[tuple[str, str, str], Resource]:
    """{policy key: the older policy it conflicts with on some target} (EG's `Conflicted` condition)."""
    return {key: older for (key, _), older in _clashes(resources).items()}


def tls_policy(resources: ResourceSet, target: BackendTarget) -> Resource | None:
    """The BackendTLSPolicy that applies to the backendRef `target`, if any: the oldest one aimed at its
    section, else the oldest aimed at the whole backend (a younger one on the same target clashes)."""
    backend = target.resource
    held = {(key, t[1:]) for key, t in _clashes(resources)}
    ident = (_group(backend.kind), backend.kind, backend.name)
    section = target_section(target)
    policies = age_order(resources.of("BackendTLSPolicy"))
    for wanted in ((section,) if section is not None else ()) + (None,):
        for policy in policies:
            if wanted in _sections(policy, backend) and (policy.key, (*ident, wanted)) not in held:
                return policy
    return None


def ca_bundle(resources: ResourceSet, policy: Resource) -> str | None:
    """The PEM bundle `policy` trusts (None: the system bundle). Raises TlsProblem when it cannot be used."""
    validation = policy.spec["validation"]
    if validation.get("wellKnownCACertificates") == "System":
        return None
    found: list[str] = []
    supported = False
    for ref in validation.get("caCertificateRefs") or []:
        kind = ref.get("kind")
        if ref.get("group", "") != "" or kind not in ("ConfigMap", "Secret"):
            continue  # EG skips refs of other kinds; only if none is usable is that the problem
        supported = True
        holder = resources.get(kind, policy.namespace, ref["name"])
        if holder is None:
            raise TlsProblem(policy, f"{kind} {policy.namespace}/{ref['name']} not found")
        value = _ca_value(holder)
        if value is None:
            raise TlsProblem(
                policy,
                f"no CA in {kind} {policy.namespace}/{ref['name']} (expected key {' or '.join(CA_KEYS)}, "
                "or a single key)",
            )
        found.append(value)
    if not found:
        if not supported:
            raise TlsProblem(
                policy, "no caCertificateRef of a supported kind (ConfigMap or Secret of the core group)", "InvalidKind"
            )
        raise TlsProblem(policy, "no valid CA certificate found in the referenced resources")
    return "\n".join(found)


def _ca_value(holder: Resource) -> str | None:
    for key in CA_KEYS:
        value = secret_value(holder, key)
        if value is not None:
            return value.decode(errors="replace")
    keys: set[Any] = {*(holder.data.get("data") or {}), *(holder.data.get("stringData") or {})}
    if len(keys) == 1:
        value = secret_value(holder, str(next(iter(keys))))
        return value.decode(errors="replace") if value is not None else None
    return None


def tls_policy_verdicts(resources: ResourceSet) -> dict[tuple[str, str, str], tuple[str, str, str]]:
    """{policy key: (Accepted reason, ResolvedRefs reason, message)} for each BackendTLSPolicy EG would not
    accept: Conflicted, or a CA that does not load. Such a policy is not applied; routes through it answer 500."""
    verdicts: dict[tuple[str, str, str], tuple[str, str, str]] = {}
    conflicted = conflicted_tls_policies(resources)
    for policy in resources.of("BackendTLSPolicy"):
        older = conflicted.get(policy.key)
        if older is not None:
            verdicts[policy.key] = (
                "Conflicted",
                "",
                f"conflicts with the older BackendTLSPolicy {older.namespace}/{older.name}",
            )
            continue
        try:
            ca_bundle(resources, policy)
        except TlsProblem as problem:
            verdicts[policy.key] = (problem.reason, problem.resolved_reason, problem.message)
    return verdicts
