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
