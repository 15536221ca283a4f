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
* **A Backend's own `spec.tls`** (`upstream_tls`). A Backend may carry its TLS settings itself: `sni`,
  `insecureSkipVerify`, and (unless it skips verification) `wellKnownCACertificates: System` or
  `caCertificateRefs` (ConfigMaps or Secrets in the Backend's namespace, read as above). A BackendTLSPolicy
  that also applies takes precedence where it says something: its CA replaces the Backend's (and the system
  store unless it asks for that itself), its hostname replaces the SNI, its subjectAltNames replace the
  names checked. TLS that ends up neither skipping verification nor trusting a CA (`tls: {}`) is an error:
  the route share answers 500 (EG's InvalidBackendTLS), never plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.errors import ConfigError
from sidecar.translate.attachment import age_order
from sidecar.translate.refs import BackendTarget, secret_value
from sidecar.translate.resources import EG_API, Resource, ResourceSet

__all__ = [
    "CA_KEYS",
    "TlsProblem",
    "UpstreamTls",
    "ca_bundle",
    "conflicted_tls_policies",
    "target_section",
    "tls_policy",
    "tls_policy_verdicts",
    "upstream_tls",
]

CA_KEYS = ("ca.crt", "tls.crt")


class TlsProblem(ConfigError):
    """Why a BackendTLSPolicy cannot be used, with EG's reasons for its Accepted and ResolvedRefs."""

    def __init__(
        self,
        policy: Resource,
        message: str,
        resolved_reason: str = "InvalidCACertificateRef",
        field: str = "spec.validation.caCertificateRefs",
    ) -> None:
        super().__init__(f"{policy.where(field)}: {message}")
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
    return _ca_refs(resources, policy, validation.get("caCertificateRefs") or [], "spec.validation.caCertificateRefs")


def _ca_refs(resources: ResourceSet, owner: Resource, refs: list[dict[str, Any]], field: str) -> str:
    """The PEM bundle of `refs` (ConfigMaps or Secrets in `owner`'s namespace), or TlsProblem."""
    found: list[str] = []
    supported = False
    for ref in refs:
        kind = ref.get("kind")
        if ref.get("group", "") != "" or kind not in ("ConfigMap", "Secret"):
            continue  # EG skips refs of other kinds; only if none is usable is that the problem
        supported = True
        holder = resources.get(kind, owner.namespace, ref["name"])
        if holder is None:
            raise TlsProblem(owner, f"{kind} {owner.namespace}/{ref['name']} not found", field=field)
        value = _ca_value(holder)
        if value is None:
            raise TlsProblem(
                owner,
                f"no CA in {kind} {owner.namespace}/{ref['name']} (expected key {' or '.join(CA_KEYS)}, "
                "or a single key)",
                field=field,
            )
        found.append(value)
    if not found:
        if not supported:
            raise TlsProblem(
                owner,
                "no caCertificateRef of a supported kind (ConfigMap or Secret of the core group)",
                "InvalidKind",
                field=field,
            )
        raise TlsProblem(owner, "no valid CA certificate found in the referenced resources", field=field)
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


@dataclass(frozen=True)
class UpstreamTls:
    """The TLS Envoy speaks to one backend, merged from the Backend's `spec.tls` and a BackendTLSPolicy."""

    sni: str | None = None
    skip_verify: bool = False
    system: bool = False  # trust the system store
    ca: str | None = None  # else this PEM bundle
    names: tuple[tuple[str, str], ...] = ()  # (DNS or URI, value) the certificate must carry; () with an SNI: the SNI

    @property
    def san_names(self) -> tuple[tuple[str, str], ...]:
        if self.skip_verify:
            return ()
        return self.names or ((("DNS", self.sni),) if self.sni else ())


def _backend_tls(resources: ResourceSet, backend: Resource) -> UpstreamTls | None:
    tls = backend.spec.get("tls")
    if tls is None:
        return None
    skip = bool(tls.get("insecureSkipVerify", False))
    system = not skip and tls.get("wellKnownCACertificates") == "System"
    ca = None
    if not skip and not system and tls.get("caCertificateRefs"):
        ca = _ca_refs(resources, backend, tls["caCertificateRefs"], "spec.tls.caCertificateRefs")
    return UpstreamTls(sni=tls.get("sni"), skip_verify=skip, system=system, ca=ca)


def _policy_tls(resources: ResourceSet, policy: Resource) -> UpstreamTls:
    validation = policy.spec["validation"]
    ca = ca_bundle(resources, policy)
    names = tuple(
        ("DNS", san["hostname"]) if san["type"] == "Hostname" else ("URI", san["uri"])
        for san in validation.get("subjectAltNames") or []
    )
    return UpstreamTls(sni=validation["hostname"], system=ca is None, ca=ca, names=names)


def upstream_tls(resources: ResourceSet, target: BackendTarget) -> UpstreamTls | None:
    """The TLS for the backendRef `target` (None: plain text), EG's merge of the Backend's own settings and
    the BackendTLSPolicy that applies. Raises TlsProblem when it cannot be used."""
    own = _backend_tls(resources, target.resource) if target.resource.kind == "Backend" else None
    policy = tls_policy(resources, target)
    from_policy = _policy_tls(resources, policy) if policy is not None else None
    if own is None:
        return from_policy
    merged = own
    if from_policy is not None:
        # The policy's CA (or system store), SNI and names win; the Backend keeps insecureSkipVerify, which
        # EG lets switch verification off even under a policy.
        merged = UpstreamTls(from_policy.sni, own.skip_verify, from_policy.system, from_policy.ca, from_policy.names)
    if not merged.skip_verify and not merged.system and merged.ca is None:
        raise TlsProblem(
            target.resource,
            "a CA is required unless insecureSkipVerify is true (caCertificateRefs or wellKnownCACertificates)",
            field="spec.tls",
        )
    return merged
