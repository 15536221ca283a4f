"""The translator's own structural schemas agree with EG's CRDs: every field it accepts exists there, and
every enum value it accepts is allowed there (deliberate exceptions listed)."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.translate.order import FILTER_ALIASES
from sidecar.translate.schema import SPEC_SCHEMAS, Enum, List, Node, Obj
from tests.support.translate_crds import CRDS, crd_refusal, crd_schemas

pytestmark = pytest.mark.skipif(not CRDS.is_dir(), reason="EG CRDs (../shared) not present")

# Accepted on purpose although the CRD has no such field: EG 1.1's release blog puts pullPolicy here.
# (Likewise the EG 1.1 filter name aliases in FILTER_ALIASES, absent from v1.9's enum.)
NOT_IN_CRD = {("EnvoyExtensionPolicy", "spec.wasm[].pullPolicy")}


def _walk(kind: str, node: Node, crd: dict[str, Any], path: str, problems: list[str]) -> int:
    checked = 0
    if isinstance(node, Obj):
        props = crd.get("properties") or {}
        for name, child in node.fields.items():
            where = f"{path}.{name}"
            if (kind, where) in NOT_IN_CRD:
                continue
            if name not in props:
                problems.append(f"{kind} {where}: not in the CRD")
                continue
            checked += 1 + _walk(kind, child, props[name], where, problems)
    elif isinstance(node, List):
        checked += _walk(kind, node.item, crd.get("items") or {}, path + "[]", problems)
    elif isinstance(node, Enum) and "enum" in crd:
        extra = [v for v in node.values if v not in crd["enum"] and v not in FILTER_ALIASES]
        if extra:
            problems.append(f"{kind} {path}: values {extra} not in the CRD enum")
        checked += 1
    return checked


def test_every_accepted_field_and_enum_value_exists_in_the_crds() -> None:
    schemas = crd_schemas()
    problems: list[str] = []
    checked = 0
    for kind, node in SPEC_SCHEMAS.items():
        if kind in schemas:
            checked += _walk(kind, node, schemas[kind]["properties"]["spec"], "spec", problems)
    assert not problems, "\n".join(problems)
    assert checked > 150


def _route_with_query(value: object) -> dict[str, Any]:
    query = {"type": "Exact", "name": "id", "value": value}
    match = {"path": {"type": "PathPrefix", "value": "/"}, "queryParams": [query]}
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "default"},
        "spec": {"parentRefs": [{"name": "eg"}], "rules": [{"matches": [match], "tls": None}]},
    }


def _gateway_with_hostname(hostname: str) -> dict[str, Any]:
    listener = {"name": "http", "protocol": "HTTP", "port": 80, "hostname": hostname}
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "eg", "namespace": "default"},
        "spec": {"gatewayClassName": "eg", "listeners": [listener]},
    }


@pytest.mark.parametrize(
    ("doc", "refusal"),
    [
        (_route_with_query("1234"), None),  # quoted: a string
        (_route_with_query(1234), "spec.rules[0].matches[0].queryParams[0].value: 1234 is not of type 'string'"),
        (_route_with_query(True), "is not of type 'string'"),
        (_gateway_with_hostname("*.example.com"), None),
        (_gateway_with_hostname("*"), "spec.listeners[0].hostname: '*' does not match"),
        (_gateway_with_hostname("Example.com"), "does not match"),
    ],
)
def test_the_api_servers_schema_check_refuses_what_the_crd_refuses(doc: dict[str, Any], refusal: str | None) -> None:
    """What the conformance run counts out of scope as "a Kubernetes API server refuses it" (null values are
    pruned first, as the API server does: the route's `tls: null` is no error)."""
    found = crd_refusal(doc)
    if refusal is None:
        assert found is None
    else:
        assert found is not None and refusal in found
