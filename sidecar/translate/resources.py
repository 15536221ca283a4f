"""Loading Envoy Gateway resources from YAML files and looking them up by reference.

Inputs are multi-document YAML files or directories of them (`*.yaml`, `*.yml`, sorted by name, not
recursive). Each document becomes a `Resource` that remembers the file it came from, so every later
error can name the file, the resource and the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.errors import ConfigError

__all__ = ["KINDS", "Resource", "ResourceSet", "load_resources", "resource_files"]

GATEWAY_API = "gateway.networking.k8s.io"
EG_API = "gateway.envoyproxy.io"

# kind -> the API group it must come from ("" is the Kubernetes core group).
KINDS: dict[str, str] = {
    "GatewayClass": GATEWAY_API,
    "Gateway": GATEWAY_API,
    "HTTPRoute": GATEWAY_API,
    "BackendTLSPolicy": GATEWAY_API,
    "Backend": EG_API,
    "EnvoyExtensionPolicy": EG_API,
    "SecurityPolicy": EG_API,
    "ClientTrafficPolicy": EG_API,
    "BackendTrafficPolicy": EG_API,
    "EnvoyProxy": EG_API,
    "Secret": "",
    "ConfigMap": "",
    "Service": "",
}


@dataclass(frozen=True)
class Resource:
    kind: str
    name: str
    namespace: str
    data: dict[str, Any] = field(repr=False)
    source: str = "<input>"

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.data.get("spec")
        return spec if isinstance(spec, dict) else {}

    @property
    def annotations(self) -> dict[str, Any]:
        meta = self.data.get("metadata") or {}
        annotations = meta.get("annotations") if isinstance(meta, dict) else None
        return annotations if isinstance(annotations, dict) else {}

    @property
    def key(self) -> tuple[str, str, str]:
        return self.kind, self.namespace, self.name

    def where(self, path: str = "") -> str:
        """`FILE: Kind/namespace/name: path` -- the prefix of every error about this resource."""
        return f"{self.source}: {self.kind}/{self.namespace}/{self.name}" + (f": {path}" if path else "")

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {message}")


class ResourceSet:
    """All loaded resources, in input order, with lookups by kind, namespace and name."""

    def __init__(self, resources: Iterable[Resource]) -> None:
        self.items: list[Resource] = []
        self._by_key: dict[tuple[str, str, str], Resource] = {}
        for res in resources:
            earlier = self._by_key.get(res.key)
            if earlier is not None:
                raise ConfigError(f"{res.where()}: duplicate resource (first defined in {earlier.source})")
            self._by_key[res.key] = res
            self.items.append(res)

    def __iter__(self) -> Iterator[Resource]:
        return iter(self.items)

    def of(self, kind: str) -> list[Resource]:
        return [r for r in self.items if r.kind == kind]

    def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        return self._by_key.get((kind, namespace, name))


def resource_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The YAML files named by `paths`: files as given, directories expanded (sorted, not recursive)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            if not found:
                raise ConfigError(f"{path}: directory holds no .yaml or .yml files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path}: no such file or directory")
    if not files:
        raise ConfigError("no input files: give -f FILE_OR_DIR")
    return files


def _documents(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        for index, doc in enumerate(yaml.safe_load_all(text)):
            if doc is not None:
                yield index, doc
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from None


def parse_document(doc: Any, source: str) -> Resource:
    """One YAML document -> Resource, checking the envelope (apiVersion, kind, metadata.name)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a Kubernetes-style resource mapping, got {type(doc).__name__}")
    kind = doc.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{source}: kind: unknown kind {kind!r} (expected one of {', '.join(sorted(KINDS))})")
    api = doc.get("apiVersion")
    group = KINDS[kind]
    if not isinstance(api, str) or (api.rpartition("/")[0] if "/" in api else "") != group:
        want = f"{group}/<version>" if group else "v1"
        raise ConfigError(f"{source}: {kind}: apiVersion: expected {want}, got {api!r}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ConfigError(f"{source}: {kind}: metadata.name: required (a non-empty string)")
    namespace = meta.get("namespace", "default")
    if not isinstance(namespace, str) or not namespace:
        raise ConfigError(f"{source}: {kind}/{meta['name']}: metadata.namespace: expected a non-empty string")
    return Resource(kind=kind, name=meta["name"], namespace=namespace, data=doc, source=source)


def load_resources(paths: Sequence[str | os.PathLike[str]]) -> ResourceSet:
    """Read every document of every file; a `kind: List` contributes its `items`."""
    resources: list[Resource] = []
    for path in resource_files(paths):
        for index, doc in _documents(path):
            source = f"{path}#{index}" if index else str(path)
            if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
                resources.extend(parse_document(item, f"{source}.items[{i}]") for i, item in enumerate(doc["items"]))
            else:
                resources.append(parse_document(doc, source))
    return ResourceSet(resources)
