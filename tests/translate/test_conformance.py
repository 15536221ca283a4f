"""Conformance with EG v1.9.0's own translator corpus (`../shared/reference/eg-v1.9.0/gatewayapi-testdata`).

For every Backend and policy in each `*.in.yaml`, EG's `*.out.yaml` says whether it was Accepted. Our
verdict: the resource, with the Gateways, Secrets, ConfigMaps, Services and the other resources that
are valid on their own, passes `validate(strict_eg=True)` and translates. Resources using fields this
translator does not implement are counted separately (their rejection says "unsupported field"), and
must be rejected with that message rather than silently mistranslated. The corpus is not part of the
project; these tests skip without it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.errors import ConfigError
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import build_bootstrap_from_resources
from sidecar.translate.resources import Resource, ResourceSet, parse_document
from sidecar.translate.rules import validate

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "eg-v1.9.0" / "gatewayapi-testdata"
pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason="EG corpus (../shared) not present")

_SECTIONS = {
    "gateways": "Gateway",
    "httpRoutes": "HTTPRoute",
    "backends": "Backend",
    "services": "Service",
    "secrets": "Secret",
    "configMaps": "ConfigMap",
    "backendTLSPolicies": "BackendTLSPolicy",
    "envoyExtensionPolicies": "EnvoyExtensionPolicy",
    "envoyextensionpolicies": "EnvoyExtensionPolicy",
    "securityPolicies": "SecurityPolicy",
    "clientTrafficPolicies": "ClientTrafficPolicy",
    "backendTrafficPolicies": "BackendTrafficPolicy",
}
_JUDGED = (
    "Backend",
    "BackendTLSPolicy",
    "EnvoyExtensionPolicy",
    "SecurityPolicy",
    "ClientTrafficPolicy",
    "BackendTrafficPolicy",
)
_BASE = ("Gateway", "Secret", "ConfigMap", "Service")


def _docs(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    data = yaml.safe_load(path.read_text()) or {}
    for section, kind in _SECTIONS.items():
        for doc in data.get(section) or []:
            doc = {k: v for k, v in doc.items() if k != "status"}
            yield kind, {**doc, "kind": kind}


def _eg_accepted(doc: dict[str, Any]) -> bool:
    status = doc.get("status") or {}
    conditions = list(status.get("conditions") or [])
    for ancestor in status.get("ancestors") or []:
        conditions += ancestor.get("conditions") or []
    # Policies say Accepted=False; EG 1.9 marks a refused Backend with type Invalid, status "False".
    return all(c["status"] == "True" for c in conditions if c["type"] in ("Accepted", "Invalid"))


Key = tuple[str, str, str, int]  # kind, namespace, name, occurrence (the corpus repeats some names)


def _keyed(items: list[tuple[str, dict[str, Any]]]) -> list[tuple[Key, dict[str, Any]]]:
    counts: dict[tuple[str, str, str], int] = {}
    result = []
    for kind, doc in items:
        meta = doc["metadata"]
        base = (kind, meta.get("namespace", "default"), meta["name"])
        counts[base] = counts.get(base, -1) + 1
        result.append(((*base, counts[base]), doc))
    return result


def _eg_verdicts(path: Path) -> dict[Key, bool]:
    data = yaml.safe_load(path.read_text()) or {}
    items = [(kind, doc) for section, kind in _SECTIONS.items() for doc in data.get(section) or []]
    return {key: _eg_accepted(doc) for key, doc in _keyed(items) if key[0] in _JUDGED}


def _accepts(resources: list[Resource]) -> str | None:
    """None if the set validates and translates, else the error."""
    try:
        rs = ResourceSet(resources)
        validate(rs, strict_eg=True)
        build_bootstrap_from_resources(rs, RenderOptions(ephemeral_ports=True, fetch_module=_no_fetch))
    except ConfigError as exc:
        return str(exc)
    return None


def _no_fetch(code: dict[str, Any], pull_secrets: dict[str, Any]) -> dict[str, Any]:
    # Fetching is checked elsewhere; here a module "exists" unless EG could not download it either.
    if "non-existent" in str(code):
        raise ConfigError("download failed: 404")
    return {"local": {"filename": "/dev/null"}}


def _our_verdicts(path: Path) -> dict[Key, str | None]:
    keyed = [(key, parse_document(doc, f"{path.name}:{key[0]}")) for key, doc in _keyed(list(_docs(path)))]
    resources = [r for _, r in keyed]
    base = [r for r in resources if r.kind in _BASE]
    backend_errors = {r.key: _accepts([*base, r]) for r in resources if r.kind == "Backend"}
    backends = [r for r in resources if r.kind == "Backend" and backend_errors[r.key] is None]
    routes = [_resolvable(base + backends, r) for r in resources if r.kind == "HTTPRoute"]
    context = base + backends + routes
    verdicts: dict[Key, str | None] = {}
    for key, res in keyed:
        if res.kind not in _JUDGED:
            continue
        error = _accepts(_unique([*context, res]))
        # A resource that depends on a Backend refused for an unsupported field is itself not judged.
        for (kind, ns, name), why in backend_errors.items():
            if error and why and "unsupported field" in why and f"no {kind} {ns}/{name} " in error:
                error = f"depends on {kind} {ns}/{name}, which uses an unsupported field"
        verdicts[key] = error
    return verdicts


def _resolvable(context: list[Resource], route: Resource) -> Resource:
    """The route without the backendRefs that do not resolve or name Services: EG keeps such a route (it
    answers 500), so it stays a valid policy target, while this translator refuses the dangling reference,
    and Services only resolve inside Kubernetes."""
    rules = []
    for rule in route.spec.get("rules") or []:
        kept = []
        for ref in rule.get("backendRefs") or []:
            probe = copy.deepcopy(route.data)
            probe["spec"]["rules"] = [{"backendRefs": [ref]}]
            if ref.get("kind") == "Backend" and _accepts_validation(
                [*context, Resource(route.kind, route.name, route.namespace, probe)]
            ):
                kept.append(ref)
        rules.append({**rule, "backendRefs": kept})
    data = copy.deepcopy(route.data)
    data["spec"]["rules"] = rules
    return Resource(route.kind, route.name, route.namespace, data, route.source)


def _accepts_validation(resources: list[Resource]) -> bool:
    try:
        validate(ResourceSet(resources), strict_eg=True)
    except ConfigError:
        return False
    return True


def _unique(resources: list[Resource]) -> list[Resource]:
    seen: dict[tuple[str, str, str], Resource] = {}
    for r in resources:
        seen.setdefault(r.key, r)
    return list(seen.values())


# Cases about EG's own deployment settings, which have no meaning here.
EXCLUDED = {
    "backend-invalid-feature-disabled": "EG's extensionApis.enableBackend switch; the Backend API is always on here",
}
CASES = (
    [p for p in sorted(CORPUS.glob("*.in.yaml")) if p.name.removesuffix(".in.yaml") not in EXCLUDED]
    if CORPUS.is_dir()
    else []
)


@pytest.mark.parametrize("path", CASES, ids=[p.name.removesuffix(".in.yaml") for p in CASES])
def test_accepts_and_rejects_as_eg_does(path: Path) -> None:
    eg = _eg_verdicts(path.with_name(path.name.replace(".in.yaml", ".out.yaml")))
    ours = _our_verdicts(path)
    mismatches = []
    for key, accepted in sorted(eg.items()):
        error = ours.get(key)
        if "unsupported field" in (error or ""):
            continue  # a feature we do not translate: refused loudly, counted in the summary test
        if (error is None) != accepted:
            mismatches.append(f"{key}: EG {'accepted' if accepted else 'rejected'}, we {error or 'accepted'}")
    assert not mismatches, "\n".join(mismatches)


def test_summary_most_of_the_corpus_is_judged() -> None:
    """Guards against the per-file test passing vacuously because everything became "unsupported"."""
    judged = agreed = unsupported = 0
    for path in CASES:
        eg = _eg_verdicts(path.with_name(path.name.replace(".in.yaml", ".out.yaml")))
        ours = _our_verdicts(path)
        for key, accepted in eg.items():
            error = ours.get(key)
            if error is not None and "unsupported field" in error:
                unsupported += 1
                continue
            judged += 1
            agreed += (error is None) == accepted
    print(f"EG corpus: {judged} resources judged, {agreed} agree, {unsupported} use unsupported fields")
    assert agreed == judged
    assert judged > unsupported
