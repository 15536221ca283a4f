"""EG v1.9.0's CRD schemas from `../shared` (tests only; the product carries its own validation)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

CRDS = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "eg-v1.9.0" / "crds"


@functools.cache
def crd_schemas() -> dict[str, dict[str, Any]]:
    """kind -> openAPIV3Schema of its first served version (v1 / v1alpha1)."""
    schemas: dict[str, dict[str, Any]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            version = next(v for v in doc["spec"]["versions"] if v.get("served"))
            schemas[doc["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


@functools.cache
def _versioned_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if version.get("served"):
                    schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def crd_refusal(doc: dict[str, Any]) -> str | None:
    """Why a Kubernetes API server would refuse `doc` by its CRD's OpenAPI schema (types, enums, patterns,
    lengths, required fields), or None: EG only ever sees what the API server stored. Not checked: the
    CRDs' CEL rules (x-kubernetes-validations), and unknown fields and null values, which the API server
    prunes before it validates."""
    import jsonschema

    schema = _versioned_schemas().get((str(doc.get("apiVersion")), str(doc.get("kind"))))
    if schema is None:
        # A version these CRDs no longer serve (BackendTLSPolicy v1alpha2): the newest one's schema, whose
        # fields and rules it kept.
        schema = crd_schemas().get(str(doc.get("kind")))
    if schema is None:
        return None
    # OpenAPI v3.0 schemas are JSON Schema draft 4 in what a CRD may use (boolean exclusiveMinimum).
    error = jsonschema.exceptions.best_match(jsonschema.Draft4Validator(schema).iter_errors(_without_nulls(doc)))
    if error is None:
        return None
    path = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in error.absolute_path).replace(".[", "[")
    return f"{path}: {error.message[:200]}"


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
