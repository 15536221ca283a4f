"""ReferenceGrants as EG decides them, on references of every kind the translator follows across namespaces.

The corpus has a handful of grant cases; these cover each field of a grant that must match (its own
namespace, from group/kind/namespace, to group/kind/name) for each kind of reference, and what refusing
it does: a route share answering 500, a policy refused naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.errors import ConfigError
from sidecar.translate.backendrefs import first_unresolved_reason
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from sidecar.translate.resources import ResourceSet, parse_document
from sidecar.translate.rules import validate

ROUTE_INTO_BACKENDS = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg}
spec:
  gatewayClassName: eg
  listeners: [{name: http, protocol: HTTP, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app}
spec:
  parentRefs: [{name: eg}]
  rules:
    - backendRefs:
        - {group: gateway.envoyproxy.io, kind: Backend, name: app, namespace: backends}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {name: app, namespace: backends}
spec:
  endpoints: [{ip: {address: 10.0.0.1, port: 8080}}]
"""


def _grant(namespace: str, source: dict[str, Any], target: dict[str, Any]) -> str:
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": "grant", "namespace": namespace},
        "spec": {"from": [source], "to": [target]},
    }
    return "---\n" + yaml.safe_dump(doc)


def _resources(text: str) -> ResourceSet:
    return ResourceSet(parse_document(doc, f"input#{i}") for i, doc in enumerate(yaml.safe_load_all(text)) if doc)


ROUTE = {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "default"}
BACKEND = {"group": "gateway.envoyproxy.io", "kind": "Backend"}


@pytest.mark.parametrize(
    ("grant", "reason"),
    [
        ("", "RefNotPermitted"),
        (_grant("backends", ROUTE, BACKEND), ""),
        (_grant("backends", ROUTE, {**BACKEND, "name": "app"}), ""),
        (_grant("backends", ROUTE, {**BACKEND, "name": "other"}), "RefNotPermitted"),
        (_grant("default", ROUTE, BACKEND), "RefNotPermitted"),  # a grant lives in the target's namespace
        (_grant("backends", {**ROUTE, "namespace": "elsewhere"}, BACKEND), "RefNotPermitted"),
        (_grant("backends", {**ROUTE, "kind": "GRPCRoute"}, BACKEND), "RefNotPermitted"),
        (_grant("backends", {**ROUTE, "group": "gateway.envoyproxy.io"}, BACKEND), "RefNotPermitted"),
        (_grant("backends", ROUTE, {"group": "", "kind": "Backend"}), "RefNotPermitted"),
        (_grant("backends", ROUTE, {"group": "", "kind": "Service"}), "RefNotPermitted"),
    ],
    ids=[
        "no-grant",
        "any-backend",
        "that-backend",
        "other-name",
        "grant-in-source-namespace",
        "from-other-namespace",
        "from-other-kind",
        "from-other-group",
        "to-other-group",
        "to-other-kind",
    ],
)
def test_route_backend_ref_into_another_namespace(grant: str, reason: str) -> None:
    resources = _resources(ROUTE_INTO_BACKENDS + grant)
    validate(resources)
    route = resources.get("HTTPRoute", "default", "app")
    assert route is not None
    assert first_unresolved_reason(resources, route) == reason


def test_a_refused_route_share_answers_500_never_reaches_the_backend(tmp_path: Path) -> None:
    path = tmp_path / "in.yaml"
    path.write_text(ROUTE_INTO_BACKENDS)
    text = yaml.safe_dump(render_bootstrap([path], RenderOptions(ephemeral_ports=True)))
    assert "10.0.0.1" not in text  # no cluster reaches the Backend in the other namespace
    path.write_text(ROUTE_INTO_BACKENDS + _grant("backends", ROUTE, BACKEND))
    assert "10.0.0.1" in yaml.safe_dump(render_bootstrap([path], RenderOptions(ephemeral_ports=True)))


EXTPROC_INTO_BACKENDS = (
    ROUTE_INTO_BACKENDS
    + """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: ext}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  extProc:
    - backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: app, namespace: backends}]
"""
)
POLICY = {"group": "gateway.envoyproxy.io", "kind": "EnvoyExtensionPolicy", "namespace": "default"}


def test_ext_proc_backend_ref_into_another_namespace_needs_a_grant() -> None:
    base = EXTPROC_INTO_BACKENDS + _grant("backends", ROUTE, BACKEND)  # the route's grant is not the policy's
    with pytest.raises(ConfigError) as refused:
        validate(_resources(base))
    assert "EnvoyExtensionPolicy/default/ext: spec.extProc[0].backendRefs[0].namespace" in str(refused.value)
    assert "ReferenceGrant" in str(refused.value)
    granted = base + _grant("backends", POLICY, BACKEND).replace("name: grant", "name: grant-2")
    validate(_resources(granted))


def test_a_reference_within_one_namespace_needs_no_grant() -> None:
    resources = _resources(ROUTE_INTO_BACKENDS.replace("namespace: backends", "namespace: default"))
    validate(resources)
    route = resources.get("HTTPRoute", "default", "app")
    assert route is not None and first_unresolved_reason(resources, route) == ""


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"from": [], "to": [BACKEND]}, "spec.from"),
        ({"from": [{"group": "", "kind": "HTTPRoute"}], "to": [BACKEND]}, "spec.from[0].namespace"),
        ({"from": [ROUTE], "to": [{"kind": "Backend"}]}, "spec.to[0].group"),
        ({"from": [ROUTE] * 17, "to": [BACKEND]}, "spec.from"),
        ({"from": [ROUTE], "to": [BACKEND], "extra": 1}, "spec.extra"),
    ],
)
def test_a_malformed_grant_is_refused_naming_the_field(spec: dict[str, Any], field: str) -> None:
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": "g", "namespace": "backends"},
        "spec": spec,
    }
    with pytest.raises(ConfigError) as refused:
        validate(_resources(ROUTE_INTO_BACKENDS + "---\n" + yaml.safe_dump(doc)))
    assert f"ReferenceGrant/backends/g: {field}" in str(refused.value)


WASM_PULL_SECRET = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: wasm}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  wasm:
    - code:
        type: Image
        image: {url: "registry.example.com/filter:v1", pullSecretRef: {name: pull, namespace: secrets}}
---
apiVersion: v1
kind: Secret
metadata: {name: pull, namespace: secrets}
type: kubernetes.io/dockerconfigjson
stringData: {.dockerconfigjson: '{"auths": {}}'}
"""


def test_a_wasm_pull_secret_in_another_namespace_needs_a_grant() -> None:
    base = ROUTE_INTO_BACKENDS + _grant("backends", ROUTE, BACKEND) + WASM_PULL_SECRET
    with pytest.raises(ConfigError) as refused:
        validate(_resources(base))
    assert "EnvoyExtensionPolicy/default/wasm: spec.wasm[0].code.image.pullSecretRef.namespace" in str(refused.value)
    secret = {"group": "", "kind": "Secret", "name": "pull"}
    validate(_resources(base + _grant("secrets", POLICY, secret).replace("name: grant", "name: grant-2")))
    other_secret = {**secret, "name": "other"}
    with pytest.raises(ConfigError):
        validate(_resources(base + _grant("secrets", POLICY, other_secret).replace("name: grant", "name: grant-2")))
