"""The translator's own structural schemas agree with EG's CRDs: every field it accepts exists there, and
every enum value it accepts is allowed there (deliberate exceptions listed)."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.translate.order import FILTER_ALIASES
from sidecar.translate.schema import SPEC_SCHEMAS, Enum, List, Node, Obj
from tests.support.translate_crds import CRDS, crd_schemas

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
