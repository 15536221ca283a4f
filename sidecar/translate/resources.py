"""Loading Envoy Gateway resources from YAML files and looking them up by reference.

Inputs are multi-document YAML files or directories of them (`*.yaml`, `*.yml`, sorted by name, not
recursive). Each document becomes a `Resource` that remembers the file it came from, so every later
error can name the file, the resource and the field.

The input is bounded (`LoadLimits`): files, directory entries, bytes, documents, nesting depth and
YAML nodes after alias expansion. Anything past a limit, anything that is not a regular UTF-8 file,
duplicate mapping keys and self-referencing aliases are refused with a ConfigError naming the file
(and line), before the rest of the render sees the data.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.errors import ConfigError

__all__ = ["KINDS", "LoadLimits", "Resource", "ResourceSet", "eg_default_reason", "load_resources", "resource_files"]

GATEWAY_API = "gateway.networking.k8s.io"
EG_API = "gateway.envoyproxy.io"

# kind -> the API group it must come from ("" is the Kubernetes core group).
KINDS: dict[str, str] = {
    "GatewayClass": GATEWAY_API,
    "Gateway": GATEWAY_API,
    "HTTPRoute": GATEWAY_API,
    "BackendTLSPolicy": GATEWAY_API,
    "ReferenceGrant": GATEWAY_API,
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


# The reason EG gives when it refuses a resource of each kind for a reason without a name of its own.
_EG_DEFAULT_REASONS = {"HTTPRoute": "UnsupportedValue", "Gateway": "Invalid", "Backend": "Invalid"}


def eg_default_reason(kind: str) -> str:
    return _EG_DEFAULT_REASONS.get(kind, "Invalid")


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
        #: What is derived from the resources and costly to derive (a listener's certificate checks),
        #: computed once per render however many builders ask: keyed by the deriving module's own tuples.
        self.derived: dict[tuple[object, ...], object] = {}
        for res in resources:
            earlier = self._by_key.get(res.key)
            if earlier is not None:
                # Kubernetes cannot hold two; EG's test inputs can, and EG judges each copy on its own. Ours
                # refuses the later copy, with EG's reason for a refusal of its kind.
                duplicate = ConfigError(f"{res.where()}: duplicate resource (first defined in {earlier.source})")
                duplicate.reason = eg_default_reason(res.kind)  # type: ignore[attr-defined]
                raise duplicate
            self._by_key[res.key] = res
            self.items.append(res)

    def __iter__(self) -> Iterator[Resource]:
        return iter(self.items)

    def of(self, kind: str) -> list[Resource]:
        return [r for r in self.items if r.kind == kind]

    def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        return self._by_key.get((kind, namespace, name))


@dataclass(frozen=True)
class LoadLimits:
    """Bounds on one render's input (`sidecar render -f`, `sidecar up -f` and each of its reloads).

    Real Envoy Gateway configurations are far inside them: a few hundred resources, a few MiB with
    certificates, a dozen levels deep.
    """

    max_files: int = 1000  # YAML files, all -f arguments together
    max_dir_entries: int = 10_000  # entries listed in one directory (YAML or not)
    max_file_bytes: int = 8 << 20  # one file
    max_total_bytes: int = 32 << 20  # all files together
    max_file_documents: int = 5000  # YAML documents in one file (empty ones included)
    max_documents: int = 10_000  # YAML documents and List items, all files together
    max_depth: int = 64  # nesting of mappings and sequences
    max_document_nodes: int = 100_000  # YAML nodes of one document, aliases expanded (PyYAML holds them all)
    max_nodes: int = 1_000_000  # YAML nodes, aliases expanded, all files together


_YAML_SUFFIXES = (".yaml", ".yml")


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path}: symlink loop") from None
        if exc.errno == errno.ENOENT and path.is_symlink():
            raise ConfigError(f"{path}: dangling symlink (its target does not exist)") from None
        if exc.errno == errno.ENOENT:
            raise ConfigError(f"{path}: no such file or directory") from None
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _directory_files(directory: Path, limits: LoadLimits) -> list[Path]:
    names: list[str] = []
    try:
        with os.scandir(directory) as entries:
            for count, entry in enumerate(entries, 1):
                if count > limits.max_dir_entries:
                    raise ConfigError(
                        f"{directory}: more than {limits.max_dir_entries} directory entries "
                        "(LoadLimits.max_dir_entries); point -f at the YAML files instead"
                    )
                if Path(entry.name).suffix in _YAML_SUFFIXES:
                    names.append(entry.name)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot list: {exc.strerror}") from None
    found: list[Path] = []
    for name in sorted(names):
        path = directory / name
        mode = _stat(path).st_mode  # follows symlinks: a loop or a dangling link is an error
        if stat.S_ISDIR(mode):
            continue  # not recursive
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: {_file_kind(mode)}, expected a YAML file")
        found.append(path)
        if len(found) > limits.max_files:
            raise ConfigError(f"{directory}: more than {limits.max_files} YAML files (LoadLimits.max_files)")
    if not found:
        raise ConfigError(f"{directory}: directory holds no .yaml or .yml files")
    return found


def resource_files(paths: Sequence[str | os.PathLike[str]], limits: LoadLimits | None = None) -> list[Path]:
    """The YAML files named by `paths`: files as given, directories expanded (sorted, not recursive)."""
    limits = limits or LoadLimits()
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        mode = _stat(path).st_mode
        if stat.S_ISDIR(mode):
            files.extend(_directory_files(path, limits))
        elif stat.S_ISREG(mode):
            files.append(path)
        else:
            raise ConfigError(f"{path}: {_file_kind(mode)}, expected a YAML file or a directory of them")
        if len(files) > limits.max_files:
            raise ConfigError(f"{path}: more than {limits.max_files} YAML files in all (LoadLimits.max_files)")
    if not files:
        raise ConfigError("no input files: give -f FILE_OR_DIR")
    return files


class _Budget:
    """What one render's files have used of the limits that span files."""

    def __init__(self, limits: LoadLimits) -> None:
        self.limits = limits
        self.bytes = 0
        self.documents = 0
        self.nodes = 0


def _read(path: Path, budget: _Budget) -> str:
    limits = budget.limits
    room = min(limits.max_file_bytes, limits.max_total_bytes - budget.bytes)
    try:
        # O_NONBLOCK: a FIFO swapped in after the listing must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        _stat(path)  # names a loop or a dangling link
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: {_file_kind(mode)}, expected a YAML file")
        try:
            data = file.read(room + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > room:
        if room == limits.max_file_bytes:
            raise ConfigError(f"{path}: larger than {limits.max_file_bytes} bytes (LoadLimits.max_file_bytes)")
        raise ConfigError(
            f"{path}: the input files together are larger than {limits.max_total_bytes} bytes "
            "(LoadLimits.max_total_bytes)"
        )
    budget.bytes += len(data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None


class _BoundedComposer(yaml.composer.Composer):
    """PyYAML's composer, refusing what PyYAML lets through or cannot survive: nesting past the depth
    limit (PyYAML recurses per level), more nodes than the limit once aliases are expanded (a few
    anchors can expand exponentially), an alias inside the node it names, and duplicate mapping keys
    (Kubernetes refuses them; PyYAML keeps the last silently)."""

    # Provided by the parser the loader mixes in (libyaml's or PyYAML's).
    check_event: Callable[..., bool]
    peek_event: Callable[[], Any]

    def __init__(self, source: str, budget: _Budget) -> None:
        super().__init__()
        self._source = source
        self._budget = budget
        self._depth = 0
        self._document_nodes = 0
        self._weights: dict[int, int] = {}  # id(node) -> nodes it expands to; kept alive by the document

    def _refuse(self, mark: Any, message: str) -> ConfigError:
        where = f"line {mark.line + 1}: " if mark is not None else ""
        return ConfigError(f"{self._source}: {where}{message}")

    def _count(self, nodes: int, mark: Any) -> None:
        budget = self._budget
        budget.nodes += nodes
        self._document_nodes += nodes
        if self._document_nodes > budget.limits.max_document_nodes:
            raise self._refuse(
                mark,
                f"more than {budget.limits.max_document_nodes} YAML nodes in one document, aliases expanded "
                "(LoadLimits.max_document_nodes)",
            )
        if budget.nodes > budget.limits.max_nodes:
            raise self._refuse(
                mark,
                f"more than {budget.limits.max_nodes} YAML nodes in all, aliases expanded (LoadLimits.max_nodes)",
            )

    def compose_document(self) -> Any:
        self._weights.clear()
        self._document_nodes = 0
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            anchored = super().compose_node(parent, index)
            weight = self._weights.get(id(anchored))
            if weight is None:
                raise self._refuse(event.start_mark, f"alias *{event.anchor} is used inside the node it names")
            self._count(weight, event.start_mark)
            return anchored
        self._depth += 1
        if self._depth > self._budget.limits.max_depth:
            raise self._refuse(
                self.peek_event().start_mark,
                f"nested deeper than {self._budget.limits.max_depth} levels (LoadLimits.max_depth)",
            )
        try:
            node: Any = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(1, node.start_mark)
        if isinstance(node, yaml.SequenceNode):
            weight = 1 + sum(self._weights[id(item)] for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            weight = 1 + sum(self._weights[id(k)] + self._weights[id(v)] for k, v in node.value)
            self._check_keys(node)
        else:
            weight = 1
        self._weights[id(node)] = weight
        return node

    def _check_keys(self, node: yaml.MappingNode) -> None:
        seen: set[tuple[str, str]] = set()
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            if (key.tag, key.value) in seen:
                raise self._refuse(key.start_mark, f"duplicate key {key.value!r} in the same mapping")
            seen.add((key.tag, key.value))


class _PythonParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's own parser, for a PyYAML built without libyaml."""

    def __init__(self, text: str) -> None:
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


def _parser_class() -> Any:
    """libyaml's parser (C) when PyYAML has it: events at C speed feeding the Python composer above."""
    if getattr(yaml, "__with_libyaml__", False):
        from yaml import cyaml

        return cyaml.CParser  # type: ignore[attr-defined]
    return _PythonParser


_Parser: Any = _parser_class()


class _Loader(_BoundedComposer, _Parser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):  # type: ignore[misc]
    def __init__(self, text: str, source: str, budget: _Budget) -> None:
        _Parser.__init__(self, text)
        _BoundedComposer.__init__(self, source, budget)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line N: not valid YAML: <problem> (<context>)` from PyYAML's or libyaml's multi-line message."""
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    if not problem:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        context = None
    return f"{where}not valid YAML: {problem}" + (f" ({context})" if context else "")


def _documents(path: Path, budget: _Budget) -> Iterator[tuple[int, Any]]:
    text = _read(path, budget)
    loader = _Loader(text, str(path), budget)
    limits = budget.limits
    try:
        index = 0
        while loader.check_node():
            if index >= limits.max_file_documents:
                raise ConfigError(
                    f"{path}: more than {limits.max_file_documents} YAML documents (LoadLimits.max_file_documents)"
                )
            budget.documents += 1
            if budget.documents > limits.max_documents:
                raise ConfigError(
                    f"{path}: more than {limits.max_documents} YAML documents in all (LoadLimits.max_documents)"
                )
            doc = loader.get_data()
            if doc is not None:
                yield index, doc
            index += 1
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from None
    except (ValueError, OverflowError) as exc:  # a scalar PyYAML matches but cannot build (2024-13-01, 5000 digits)
        raise ConfigError(f"{path}: not valid YAML: a value cannot be read: {exc}") from None
    finally:
        loader.dispose()


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


def load_resources(paths: Sequence[str | os.PathLike[str]], limits: LoadLimits | None = None) -> ResourceSet:
    """Read every document of every file, within `limits`; a `kind: List` contributes its `items`."""
    budget = _Budget(limits or LoadLimits())
    resources: list[Resource] = []
    for path in resource_files(paths, budget.limits):
        for index, doc in _documents(path, budget):
            source = f"{path}#{index}" if index else str(path)
            if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
                budget.documents += len(doc["items"])
                if budget.documents > budget.limits.max_documents:
                    raise ConfigError(
                        f"{source}: more than {budget.limits.max_documents} resources in all (LoadLimits.max_documents)"
                    )
                resources.extend(parse_document(item, f"{source}.items[{i}]") for i, item in enumerate(doc["items"]))
            else:
                resources.append(parse_document(doc, source))
    return ResourceSet(resources)
