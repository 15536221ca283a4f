"""EG v1.9.0's translator corpus as an oracle: each case's inputs, EG's decisions, and ours.

A case is `NAME.in.yaml` (the resources, by section) and `NAME.out.yaml` (the same resources with EG's
status conditions, and the `xdsIR` EG derived). EG's test harness adds fixtures to every case (the
Services `default/service-1..4`, `default/mirror-service`, `monitoring/otel-collector` and the Secrets of
`base/base.yaml`); `load_case` adds the same.

Our decisions come from the translator's own contract: `translate()` raises a ConfigError naming the
file and the resource it refuses. Each resource gets a unique `source` token, so the resource an error
names is known; it is recorded as refused (with the EG reason the error carries, `Invalid` when it
carries none), left out, and the rest translated again, the way EG leaves a rejected resource out and
carries on. What the translator refuses as an *unsupported field* is out of scope (it must say so), and
so is every resource that depends on one, or on a kind the translator does not load.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.errors import ConfigError
from sidecar.translate.options import RenderOptions
from sidecar.translate.resources import KINDS, Resource, ResourceSet, parse_document

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "eg-v1.9.0"
CORPUS = SHARED / "gatewayapi-corpus"

SECTIONS = {
    "gateways": "Gateway",
    "httpRoutes": "HTTPRoute",
    "httproutes": "HTTPRoute",
    "backends": "Backend",
    "services": "Service",
    "secrets": "Secret",
    "configMaps": "ConfigMap",
    "configmaps": "ConfigMap",
    "backendTLSPolicies": "BackendTLSPolicy",
    "envoyExtensionPolicies": "EnvoyExtensionPolicy",
    "envoyextensionpolicies": "EnvoyExtensionPolicy",
    "EnvoyExtensionPolicies": "EnvoyExtensionPolicy",
    "securityPolicies": "SecurityPolicy",
    "SecurityPolicies": "SecurityPolicy",
    "clientTrafficPolicies": "ClientTrafficPolicy",
    "backendTrafficPolicies": "BackendTrafficPolicy",
    "envoyProxiesForGateways": "EnvoyProxy",
    "referenceGrants": "ReferenceGrant",
    "envoyProxyForGatewayClass": "EnvoyProxy",
}
# Sections that carry no resource a user writes for this translator (EG's own deployment and Kubernetes'
# bookkeeping); they neither count nor make anything out of scope.
NEUTRAL = {"namespaces", "endpointSlices", "endpointslices", "gatewayClass", "xdsIR", "infraIR"}
# The kinds whose decisions are compared (Secrets, ConfigMaps, Services and EnvoyProxies are inputs only).
JUDGED = (
    "Gateway",
    "HTTPRoute",
    "Backend",
    "BackendTLSPolicy",
    "EnvoyExtensionPolicy",
    "SecurityPolicy",
    "ClientTrafficPolicy",
    "BackendTrafficPolicy",
)
# EG's harness turns these on for some cases; they have no meaning outside Kubernetes or are EG switches.
EXCLUDED = {
    "backend-invalid-feature-disabled": "EG's extensionApis.enableBackend switch; the Backend API is always on here",
}
UNSUPPORTED = "unsupported"  # "unknown or unsupported field", "unsupported value", "unsupported outside Kubernetes"

Key = tuple[str, str, str, int]  # kind, namespace, name, occurrence (a few cases repeat a name)


@dataclass(frozen=True)
class Decision:
    """Accepted and ResolvedRefs of one resource, as EG's status says or as our translator decided."""

    accepted: bool
    reason: str = ""
    resolved: bool = True
    resolved_reason: str = ""

    def same(self, other: Decision, reasons: bool = True) -> bool:
        if (self.accepted, self.resolved) != (other.accepted, other.resolved):
            return False
        if not reasons:
            return True
        return (self.accepted or self.reason == other.reason) and (
            self.resolved or self.resolved_reason == other.resolved_reason
        )


@dataclass
class Case:
    name: str
    inputs: list[tuple[Key, dict[str, Any]]]  # the resources this translator loads, keyed
    foreign: list[tuple[str, dict[str, Any]]]  # (section, doc) of kinds it does not load
    out: dict[str, Any]
    eg: dict[Key, Decision] = field(default_factory=dict)
    class_proxies: set[Key] = field(default_factory=set)  # the EnvoyProxy of the GatewayClass (at most one)
    own: int = 0  # how many of `inputs` the case itself holds (the harness's fixtures follow them)
    # Services whose endpoints the case's EndpointSlices give as none (EG answers 503 for them).
    without_endpoints: set[tuple[str, str]] = field(default_factory=set)


def case_names() -> list[str]:
    if not CORPUS.is_dir():
        return []
    names = sorted(p.name.removesuffix(".in.yaml") for p in CORPUS.glob("*.in.yaml"))
    return [n for n in names if n not in EXCLUDED and (CORPUS / f"{n}.out.yaml").is_file()]


def _fixtures() -> list[tuple[str, dict[str, Any]]]:
    """What EG's harness adds to every case."""

    def service(namespace: str, name: str, ip: str, ports: list[tuple[str, int, str]]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"namespace": namespace, "name": name},
            "spec": {
                "clusterIP": ip,
                "ports": [{"name": n, "port": p, "targetPort": p, "protocol": proto} for n, p, proto in ports],
            },
        }

    standard = [("http", 8080, "TCP"), ("https", 8443, "TCP"), ("tcp", 8163, "TCP"), ("udp", 8162, "UDP")]
    docs = [("Service", service("default", f"service-{i}", "1.1.1.1", standard)) for i in range(1, 5)]
    docs.append(("Service", service("default", "mirror-service", "2.2.2.2", [("http", 8080, "TCP")])))
    otel = service("monitoring", "otel-collector", "3.3.3.3", [("grpc", 4317, "TCP"), ("zipkin", 9411, "TCP")])
    docs.append(("Service", otel))
    base = yaml.safe_load((CORPUS / "base" / "base.yaml").read_text()) or {}
    docs += [("Secret", {**s, "kind": "Secret"}) for s in base.get("secrets") or []]
    return docs


def _keyed(items: list[tuple[str, dict[str, Any]]]) -> list[tuple[Key, dict[str, Any]]]:
    counts: dict[tuple[str, str, str], int] = {}
    result = []
    for kind, doc in items:
        meta = doc.get("metadata") or {}
        base = (kind, str(meta.get("namespace", "default")), str(meta.get("name", "")))
        counts[base] = counts.get(base, -1) + 1
        result.append(((*base, counts[base]), doc))
    return result


def _sections(data: dict[str, Any]) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    for section, items in data.items():
        if section == "envoyProxyForGatewayClass" and isinstance(items, dict):
            items = [items]  # the GatewayClass's EnvoyProxy: here, the one no Gateway references
        if section in NEUTRAL or not isinstance(items, list):
            continue
        for doc in items:
            if isinstance(doc, dict):
                yield section, SECTIONS.get(section), doc


def load_case(name: str) -> Case:
    data = yaml.safe_load((CORPUS / f"{name}.in.yaml").read_text()) or {}
    out = yaml.safe_load((CORPUS / f"{name}.out.yaml").read_text()) or {}
    ours: list[tuple[str, dict[str, Any]]] = []
    foreign: list[tuple[str, dict[str, Any]]] = []
    for section, kind, doc in _sections(data):
        if kind is None:
            foreign.append((section, doc))
        else:
            ours.append((kind, {**{k: v for k, v in doc.items() if k != "status"}, "kind": kind}))
    case = Case(name, _keyed(ours + _fixtures()), foreign, out, own=len(ours))
    case.without_endpoints = _services_without_endpoints(data)
    case.eg = eg_decisions(out)
    proxy = data.get("envoyProxyForGatewayClass")
    if isinstance(proxy, dict):
        meta = proxy.get("metadata") or {}
        case.class_proxies = {
            k for k, _ in case.inputs if k[:3] == ("EnvoyProxy", meta.get("namespace", "default"), meta.get("name"))
        }
    return case


def _services_without_endpoints(data: dict[str, Any]) -> set[tuple[str, str]]:
    """(namespace, name) of each Service the case's EndpointSlices cover without a single address."""
    addresses: dict[tuple[str, str], int] = {}
    for section in ("endpointSlices", "endpointslices"):
        for item in data.get(section) or []:
            meta = item.get("metadata") or {}
            service = (meta.get("labels") or {}).get("kubernetes.io/service-name")
            if service:
                key = (str(meta.get("namespace", "default")), str(service))
                found = sum(len(e.get("addresses") or []) for e in item.get("endpoints") or [])
                addresses[key] = addresses.get(key, 0) + found
    return {key for key, count in addresses.items() if count == 0}


# ---- EG's decisions --------------------------------------------------------------------------------


def _first_false(conditions: list[dict[str, Any]], kind: str) -> tuple[bool, str]:
    for cond in conditions:
        if cond.get("type") == kind and str(cond.get("status")) == "False":
            return False, str(cond.get("reason", ""))
    return True, ""


def _eg_decision(kind: str, doc: dict[str, Any]) -> Decision | None:
    status = doc.get("status") or {}
    if kind == "Backend":
        conds = status.get("conditions") or []
        if not conds:
            return None
        # EG 1.9 marks a refused Backend with a condition of type Invalid, status False.
        ok = all(str(c.get("status")) == "True" for c in conds if c.get("type") in ("Accepted", "Invalid"))
        return Decision(ok, "" if ok else "Invalid")
    if kind == "Gateway":
        conds = list(status.get("conditions") or [])
        for listener in status.get("listeners") or []:
            conds += listener.get("conditions") or []
        if not conds:
            return None
        accepted, reason = _first_false(conds, "Accepted")
        resolved, resolved_reason = _first_false(conds, "ResolvedRefs")
        return Decision(accepted, reason, resolved, resolved_reason)
    parents = status.get("parents") if kind == "HTTPRoute" else status.get("ancestors")
    conds = [c for p in parents or [] for c in p.get("conditions") or []]
    if not conds:
        return None
    accepted, reason = _first_false(conds, "Accepted")
    resolved, resolved_reason = _first_false(conds, "ResolvedRefs")
    if kind not in ("HTTPRoute", "BackendTLSPolicy"):
        resolved, resolved_reason = True, ""
    return Decision(accepted, reason, resolved, resolved_reason)


def eg_decisions(out: dict[str, Any]) -> dict[Key, Decision]:
    items = [(kind, doc) for _, kind, doc in _sections(out) if kind is not None]
    found = {}
    for key, doc in _keyed(items):
        if key[0] in JUDGED:
            decision = _eg_decision(key[0], doc)
            if decision is not None:
                found[key] = decision
    return found


# ---- our decisions ---------------------------------------------------------------------------------


def _refs(res: Resource) -> Iterator[tuple[str, str, str]]:
    """(kind, namespace, name) of every resource `res` references."""
    spec = res.spec
    for ref in spec.get("targetRefs") or ([spec["targetRef"]] if isinstance(spec.get("targetRef"), dict) else []):
        if isinstance(ref, dict):
            yield str(ref.get("kind")), res.namespace, str(ref.get("name"))
    params = (spec.get("infrastructure") or {}).get("parametersRef") if res.kind == "Gateway" else None
    if isinstance(params, dict):
        yield str(params.get("kind")), res.namespace, str(params.get("name"))
    for parent in spec.get("parentRefs") or []:
        if isinstance(parent, dict):
            yield str(parent.get("kind", "Gateway")), str(parent.get("namespace", res.namespace)), str(parent["name"])

    def backend_refs(holder: Any) -> Iterator[tuple[str, str, str]]:
        for ref in (holder or {}).get("backendRefs") or []:
            if isinstance(ref, dict):
                yield str(ref.get("kind", "Service")), str(ref.get("namespace", res.namespace)), str(ref.get("name"))

    for rule in spec.get("rules") or []:
        if isinstance(rule, dict):
            yield from backend_refs(rule)
    for ext in spec.get("extProc") or []:
        if isinstance(ext, dict):
            yield from backend_refs(ext)


API_SERVER = "a Kubernetes API server refuses it"


def api_server_refusals(case: Case) -> dict[Key, str]:
    """The case's resources a Kubernetes API server would refuse, with why: by the OpenAPI schema of EG's
    CRDs (a quoted-less integer where a string is due, a hostname `*`, a missing required field; EG's
    harness reads YAML as Go does, leniently), or a second object of one kind, namespace and name (the
    server keeps one). EG decides on them in its corpus; no cluster ever hands them to EG."""
    from tests.support.translate_crds import crd_refusal

    found: dict[Key, str] = {}
    own = case.inputs[: case.own]  # a case's own Service may share a fixture's name: EG's harness takes the case's
    named = {key[:3] for key, _ in own if key[3] > 0}
    for key, doc in own:
        why = crd_refusal(doc)
        if why is not None:
            found[key] = f"{API_SERVER} (EG's CRD schema): {why}"
        elif key[:3] in named:
            found[key] = f"{API_SERVER}: it holds one {key[0]} named {key[1]}/{key[2]}, the case has several"
    return found


_TOKEN = re.compile(r"^@(\d+)\b")


def _mock_fetch(code: dict[str, Any], pull_secrets: dict[str, Any]) -> dict[str, Any]:
    """EG's harness Wasm cache: the module's checksum is sha256("salt" + hex sha256(url))."""
    url = str((code.get("http") or code.get("image") or {}).get("url", ""))
    if code.get("image") is not None:  # EG hands its cache the normalised reference
        url = url.removeprefix("oci://")
        tagged = "@" in url or ":" in url.rsplit("/", 1)[-1]
        url = "oci://" + url + ("" if tagged else ":latest")
    want = (code.get("http") or code.get("image") or {}).get("sha256")
    checksum = hashlib.sha256(b"salt" + hashlib.sha256(url.encode()).hexdigest().encode()).hexdigest()
    if want and want != checksum:
        raise ConfigError(f"module downloaded from {url} has checksum {checksum}, which does not match: {want}")
    return {"local": {"filename": f"/var/lib/wasm/{checksum}.wasm"}}


def render_options() -> RenderOptions:
    return RenderOptions(ephemeral_ports=True, fetch_module=_mock_fetch)


@dataclass
class Outcome:
    """What the translator made of one case."""

    decisions: dict[Key, Decision]
    refused: dict[Key, str]  # out of scope: the unsupported-field message (or why it depends on one)
    errors: dict[Key, str]  # refused in scope: the error
    bootstrap: dict[str, Any] | None
    unattributed: str | None = None  # an error naming no resource, or a crash


def _reason(exc: ConfigError) -> str:
    return str(getattr(exc, "reason", "") or "Invalid")


def corpus_translate(case: Case) -> Callable[[ResourceSet], dict[str, Any]]:
    """The translator as EG's harness runs it: EG's in-cluster rules, except for `*-host-infra*` cases
    (EG's `RunningOnHost`, where loopback Backends are fine)."""
    from sidecar.translate.render import translate
    from sidecar.translate.rules import validate

    def run(resources: ResourceSet) -> dict[str, Any]:
        validate(resources, strict_eg="-host-infra" not in case.name)
        return translate(resources, render_options())

    return run


def our_outcome(
    case: Case, translate: Callable[[ResourceSet], dict[str, Any]] | None = None, api_server: bool = True
) -> Outcome:
    """What the translator makes of `case`; with `api_server`, without what an API server would refuse."""
    translate = translate or corpus_translate(case)
    resources = {
        key: parse_document(copy.deepcopy(doc), f"@{i}") for i, (key, doc) in enumerate(case.inputs) if key[0] in KINDS
    }
    by_token = {f"@{i}": key for i, (key, _) in enumerate(case.inputs)}
    foreign_kinds = {str(doc.get("kind") or section) for section, doc in case.foreign}
    foreign = {
        (str(doc.get("kind")), str(meta.get("namespace", "default")), str(meta.get("name")))
        for _, doc in case.foreign
        if isinstance(meta := doc.get("metadata") or {}, dict)
    }
    refused: dict[Key, str] = {}
    errors: dict[Key, str] = {}
    reasons: dict[Key, str] = {}
    live = dict(resources)

    def out_of_scope(key: Key, why: str) -> None:
        refused[key] = why
        live.pop(key, None)

    # What a Kubernetes API server would not store never reaches EG: out of scope (api_server_refusals).
    for key, why in api_server_refusals(case).items() if api_server else ():
        if key in live:
            out_of_scope(key, why)
    # A resource naming a kind this translator does not load (GRPCRoute, ListenerSet, ...) is out of scope.
    for key, res in list(live.items()):
        for kind, ns, name in _refs(res):
            if kind in foreign_kinds or (kind, ns, name) in foreign or kind not in KINDS:
                out_of_scope(key, f"references {kind} {ns}/{name}, a kind this translator does not load")
                break
    bootstrap = None
    unattributed = None
    for _ in range(len(resources) + 1):
        # Dependants of what is out of scope are out of scope too (until nothing changes). The GatewayClass's
        # EnvoyProxy applies to every Gateway: if it is out of scope, so are they (and what attaches to them).
        changed = True
        while changed:
            changed = False
            if any(k in refused for k in case.class_proxies):
                for key in [k for k in live if k[0] == "Gateway"]:
                    out_of_scope(key, "its GatewayClass's EnvoyProxy is out of scope")
                    changed = True
            gone = {k[:3] for k in refused}
            for key, res in list(live.items()):
                hit = next((r for r in _refs(res) if r in gone), None) or _older_claim(key, refused, resources)
                if hit is not None:
                    out_of_scope(key, f"depends on {hit[0]} {hit[1]}/{hit[2]}, which is out of scope")
                    changed = True
        try:
            bootstrap = translate(ResourceSet(live.values()))
            break
        except ConfigError as exc:
            message = str(exc)
            if "no Gateway in the input files" in message:
                break
            match = _TOKEN.match(message)
            if match is None or by_token.get(match.group(0)) not in live:
                unattributed = message
                break
            key = by_token[match.group(0)]
            if UNSUPPORTED in message:
                out_of_scope(key, message)
            else:
                errors[key] = message
                reasons[key] = _reason(exc)
                live.pop(key)
        except Exception as exc:  # a crash is a finding: the case is counted as not matched
            unattributed = f"crash: {type(exc).__name__}: {exc}"
            break
    decisions: dict[Key, Decision] = {}
    final = ResourceSet(live.values())
    route_state = _route_resolution(final) if unattributed is None else {}
    route_state.update(_listener_resolution(final) if unattributed is None else {})
    verdicts = _translator_verdicts(final) if unattributed is None else {}
    for key in resources:
        if key[0] not in JUDGED or key in refused:
            continue
        if key in errors:
            # EG resolves a refused route's backendRefs all the same (ResolvedRefs is its own condition).
            resolved_reason = _refused_route_resolution(final, resources[key]) if key[0] == "HTTPRoute" else ""
            decisions[key] = Decision(False, reasons[key], not resolved_reason, resolved_reason)
        elif key[:3] in verdicts:
            reason, resolved_reason, _ = verdicts[key[:3]]
            decisions[key] = Decision(False, reason, not resolved_reason, resolved_reason)
        elif unattributed is None:
            resolved_reason = route_state.get(key[:3], "")
            decisions[key] = Decision(True, "", not resolved_reason, resolved_reason)
    return Outcome(decisions, refused, errors, bootstrap, unattributed)


def _claims(res: Resource) -> set[tuple[str, str, str, str]]:
    single = res.spec.get("targetRef")
    refs = res.spec.get("targetRefs") or ([single] if isinstance(single, dict) else [])
    return {
        (str(r.get("kind")), res.namespace, str(r.get("name")), str(r.get("sectionName") or ""))
        for r in refs
        if isinstance(r, dict)
    }


def _older_claim(key: Key, refused: dict[Key, str], resources: dict[Key, Resource]) -> tuple[str, str, str] | None:
    """An out-of-scope policy of `key`'s kind, older, on one of its targets: EG keeps that one and marks this
    one Conflicted, a decision that rests on a resource this run leaves out."""
    from sidecar.translate.attachment import CLAIMING_KINDS, creation_time

    if key[0] not in CLAIMING_KINDS:
        return None
    mine = resources[key]
    order = list(resources)
    for other in refused:
        if other[0] != key[0] or other not in resources or not _claims(mine) & _claims(resources[other]):
            continue
        if (creation_time(resources[other]), order.index(other)) < (creation_time(mine), order.index(key)):
            return other[:3]
    return None


def _translator_verdicts(resources: ResourceSet) -> dict[tuple[str, str, str], tuple[str, str, str]]:
    """Resources the translator leaves out without stopping the render (as EG does), where it can say."""
    try:
        from sidecar.translate import backendtls  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return {}
    found: dict[tuple[str, str, str], tuple[str, str, str]] = dict(backendtls.tls_policy_verdicts(resources))
    found.update(_gateway_verdicts(resources))
    return found


def _gateway_verdicts(resources: ResourceSet) -> dict[tuple[str, str, str], tuple[str, str, str]]:
    """A Gateway with a listener EG does not accept (an unsupported protocol) reads Accepted=False in EG's
    status (the first listener condition that is False), though the Gateway and its other listeners stay."""
    from sidecar.translate.listeners import listener_verdicts

    found: dict[tuple[str, str, str], tuple[str, str, str]] = {}
    for gateway in resources.of("Gateway"):
        refused = [v for v in listener_verdicts(resources, gateway) if not v.accepted]
        if refused:
            found[gateway.key] = (refused[0].reason, "", refused[0].why)
    return found


def _listener_resolution(resources: ResourceSet) -> dict[tuple[str, str, str], str]:
    """(Gateway key -> the ResolvedRefs reason of its first listener whose certificates do not all load, or
    whose allowedRoutes.kinds EG refuses)."""
    from sidecar.translate.certificates import gateway_listener_reasons
    from sidecar.translate.listeners import listener_verdicts

    found: dict[tuple[str, str, str], str] = {}
    for gateway in resources.of("Gateway"):
        certificates = {n: c.reason for n, c in gateway_listener_reasons(resources, gateway) if c.reason}
        reasons = []
        for verdict in listener_verdicts(resources, gateway):  # in listener order, as EG's status lists them
            if verdict.reason == "InvalidRouteKinds":
                reasons.append(verdict.reason)
            elif verdict.field != "tls":  # EG reads no certificate of a listener whose tls does not fit
                reasons.append(certificates.get(str(verdict.listener["name"]), ""))
        if any(reasons):
            found[gateway.key] = next(r for r in reasons if r)
    return found


def _refused_route_resolution(live: ResourceSet, route: Resource) -> str:
    from sidecar.translate.backendrefs import first_unresolved_reason

    try:
        return first_unresolved_reason(ResourceSet([*live, route]), route)
    except ConfigError:  # a backendRef the translator refuses outright: what refused the route may be it
        return ""


def _route_resolution(resources: ResourceSet) -> dict[tuple[str, str, str], str]:
    """(HTTPRoute key -> the reason of its first unresolved backendRef), where the translator can say."""
    try:
        from sidecar.translate import backendrefs  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return {}
    found: dict[tuple[str, str, str], str] = {}
    for route in resources.of("HTTPRoute"):
        reason = backendrefs.first_unresolved_reason(resources, route)
        if reason:
            found[route.key] = reason
    return found


def semantic_checks(case: Case, outcome: Outcome) -> list[Any]:
    """The semantics of our render against the case's xdsIR (translate_semantics.py), in-scope parts only."""
    from tests.support.translate_semantics import compare

    if outcome.bootstrap is None or outcome.unattributed is not None:
        return []
    accepted = {
        key[1:3]
        for key, decision in outcome.decisions.items()
        if key[0] == "HTTPRoute" and decision.accepted and (eg := case.eg.get(key)) is not None and eg.accepted
    }
    # A route a refused policy targets (directly or through its Gateway) is not in scope either: EG applies
    # that policy there, and we cannot.
    docs = dict(case.inputs)
    # So is one a policy we reject targets: our render is then refused as a whole (exit 2), where EG serves
    # 500 on the policy's routes; neither lets traffic through, and there is no render to compare.
    touched = {
        (kind, ns, name)
        for key in [*outcome.refused, *outcome.errors]
        if key in docs and key[0] != "HTTPRoute"
        for kind, ns, name in _refs(parse_document(copy.deepcopy(docs[key]), "refused"))
    }
    gateways_of = {
        key[1:3]: {(p.get("namespace", key[1]), p["name"]) for p in (doc.get("spec") or {}).get("parentRefs") or []}
        for key, doc in case.inputs
        if key[0] == "HTTPRoute"
    }
    # So is one routing to a Service the case's EndpointSlices leave without endpoints (EG: 503): this
    # translator loads no EndpointSlices (there are no pods outside Kubernetes) and reaches a Service at its
    # clusterIP, as the comparison takes each of EG's Service endpoints to be.
    accepted -= {
        key[1:3]
        for key, doc in case.inputs
        if key[0] == "HTTPRoute"
        and any(
            (str(ref.get("namespace", key[1])), str(ref.get("name"))) in case.without_endpoints
            for rule in (doc.get("spec") or {}).get("rules") or []
            for ref in rule.get("backendRefs") or []
            if ref.get("kind", "Service") == "Service"
        )
    }
    accepted = {
        route
        for route in accepted
        if ("HTTPRoute", *route) not in touched
        and not any(("Gateway", *gw) in touched for gw in gateways_of.get(route, set()))
    }
    refused_kinds = {key[0] for key in outcome.refused}
    features = {kind for kind in JUDGED if kind not in refused_kinds}
    services = {  # the first of a name wins, as EG's lookup finds it (the case's own before the fixtures)
        (key[1], key[2]): parse_document(copy.deepcopy(doc), "fixture")
        for key, doc in reversed(case.inputs)
        if key[0] == "Service"
    }
    gateways = {
        key[1:3]
        for key, decision in outcome.decisions.items()
        if key[0] == "Gateway" and decision.accepted and (eg := case.eg.get(key)) is not None and eg.accepted
    }
    return compare(case.out.get("xdsIR") or {}, outcome.bootstrap, accepted, features, services, gateways)


TABLE_ROWS = (
    "Gateway",
    "HTTPRoute",
    "Backend",
    "BackendTLSPolicy",
    "SecurityPolicy",
    "ClientTrafficPolicy",
    "BackendTrafficPolicy",
    "EnvoyExtensionPolicy",
)


def corpus_table(results: list[tuple[Case, Outcome, list[Any]]]) -> str:
    """The Markdown table of docs/translator.md: per resource kind, what the corpus run shows."""
    in_scope: dict[str, int] = {}
    decided: dict[str, int] = {}
    checked: dict[str, int] = {}
    agreed: dict[str, int] = {}
    refused: dict[str, int] = {}
    for case, outcome, checks in results:
        for key, eg in case.eg.items():
            if key in outcome.refused:
                continue
            in_scope[key[0]] = in_scope.get(key[0], 0) + 1
            ours = outcome.decisions.get(key)
            decided[key[0]] = decided.get(key[0], 0) + bool(ours is not None and eg.same(ours))
        for key in outcome.refused:
            if key[0] in TABLE_ROWS:
                refused[key[0]] = refused.get(key[0], 0) + 1
        for check in checks:
            checked[check.feature] = checked.get(check.feature, 0) + 1
            agreed[check.feature] = agreed.get(check.feature, 0) + check.same

    def cell(done: int, total: int) -> str:
        return f"{done} / {total}" if total else "-"

    lines = [
        f"EG v1.9.0 corpus: {len(results)} cases.",
        "",
        "| feature | in-scope resources | decisions matched | semantics matched | refused as out of scope |",
        "|---|---|---|---|---|",
    ]
    for kind in TABLE_ROWS:
        lines.append(
            f"| {kind} | {in_scope.get(kind, 0)} | {cell(decided.get(kind, 0), in_scope.get(kind, 0))} "
            f"| {cell(agreed.get(kind, 0), checked.get(kind, 0))} | {refused.get(kind, 0)} |"
        )
    total = sum(in_scope.values())
    lines.append(
        f"| **all** | {total} | {cell(sum(decided.values()), total)} "
        f"| {cell(sum(agreed.values()), sum(checked.values()))} | {sum(refused.values())} |"
    )
    return "\n".join(lines) + "\n"
