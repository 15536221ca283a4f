"""The Wasm image layouts: building them (for `sidecar wasm push`) and unpacking a compat layer.

* `oci`: OCI artifact, config `application/vnd.module.wasm.config.v1+json`, one layer
  `application/vnd.module.wasm.content.layer.v1+wasm` that is the module itself.
* `compat`: OCI image whose tar+gzip layer holds `plugin.wasm` (annotation
  `module.wasm.image/variant=compat`).
* `docker`: the same compat layer in a Docker schema-2 manifest (`...rootfs.diff.tar.gzip`).

Unpacking never uses a member name as a path and never trusts a member's declared size: the module
is copied in chunks into a file we name, with a hard cap. The member must be named exactly
`plugin.wasm` or `./plugin.wasm` (not `/plugin.wasm`, not `a/../plugin.wasm`), be a regular file, and
be the only one of that name (a tar may hold a name twice; which copy "wins" differs between tools).
The layer is read as a stream with a cap on the bytes it inflates to and the deadline checked on every
read, so a gzip bomb or a layer of huge skipped members ends in an error, not in minutes of work.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sidecar.wasm.fetch.auth import DockerConfig, naming_the_credential_store, resolve_credentials
from sidecar.wasm.fetch.binary import structure_problem
from sidecar.wasm.fetch.errors import BadReferenceError, NotWasmError, TooLargeError
from sidecar.wasm.fetch.oci import (
    DOCKER_MANIFEST,
    DOCKER_TAR_GZIP,
    OCI_INDEX,
    OCI_MANIFEST,
    OCI_TAR_GZIP,
    WASM_LAYER,
    RegistryClient,
    check_ref_for_push,
)
from sidecar.wasm.fetch.reference import parse_image_ref
from sidecar.wasm.fetch.transfer import Deadline, FetchOptions

__all__ = [
    "LAYOUTS",
    "BuiltImage",
    "PushResult",
    "build_image",
    "build_index",
    "extract_plugin",
    "push_image",
]

LAYOUTS = ("oci", "compat", "docker")
_WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
_MAX_TAR_MEMBERS = 10_000
_PLUGIN_NAMES = ("plugin.wasm", "./plugin.wasm")
_TAR_SLACK = 1 << 20  # tar headers and padding around the module, on top of twice the module cap


@dataclass(frozen=True)
class BuiltImage:
    """Blobs to upload (config and layer) and the manifest that lists them."""

    blobs: tuple[bytes, ...]
    manifest: bytes
    media_type: str


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def _plugin_tar_gz(module: bytes) -> bytes:
    """A reproducible tar+gzip holding `plugin.wasm` (fixed mtime, owner and mode)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size, info.mode, info.mtime = len(module), 0o644, 0
        tar.addfile(info, io.BytesIO(module))
    return gzip.compress(raw.getvalue(), mtime=0)


def build_image(module: bytes, layout: str) -> BuiltImage:
    if layout == "oci":
        config = b"{}"
        layer_type, config_type, manifest_type = WASM_LAYER, _WASM_CONFIG, OCI_MANIFEST
        layer = module
        annotations: dict[str, str] = {}
    elif layout in ("compat", "docker"):
        layer = _plugin_tar_gz(module)
        diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            },
            sort_keys=True,
        ).encode()
        if layout == "compat":
            layer_type, config_type, manifest_type = OCI_TAR_GZIP, _OCI_CONFIG, OCI_MANIFEST
            annotations = {"module.wasm.image/variant": "compat"}
        else:
            layer_type, config_type, manifest_type = DOCKER_TAR_GZIP, _DOCKER_CONFIG, DOCKER_MANIFEST
            annotations = {}
    else:
        raise BadReferenceError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": _descriptor(config_type, config),
        "layers": [_descriptor(layer_type, layer)],
    }
    if annotations:
        manifest["annotations"] = annotations
    return BuiltImage((config, layer), json.dumps(manifest, sort_keys=True).encode(), manifest_type)


def build_index(manifest: bytes, media_type: str, platforms: tuple[tuple[str, str], ...]) -> bytes:
    """An OCI index listing `manifest` once per (os, architecture); the puller picks linux/amd64."""
    entries = [dict(_descriptor(media_type, manifest), platform={"os": o, "architecture": a}) for o, a in platforms]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, sort_keys=True).encode()


class _InflateCap:
    """A file-like reader over the inflated layer that stops at `limit` bytes and at the deadline."""

    def __init__(self, source: IO[bytes] | gzip.GzipFile, limit: int, deadline: Deadline, where: str) -> None:
        self._source = source
        self._limit = limit
        self._deadline = deadline
        self._where = where
        self._total = 0

    def read(self, size: int = -1) -> bytes:
        self._deadline.check(f"unpacking {self._where}, {self._total} bytes inflated")
        want = self._limit + 1 - self._total if size < 0 else min(size, self._limit + 1 - self._total)
        data = self._source.read(max(want, 0))
        self._total += len(data)
        if self._total > self._limit:
            raise NotWasmError(f"{self._where}: layer inflates to more than {self._limit} bytes")
        return data


def extract_plugin(blob: Path, out: IO[bytes], cap: int, deadline: Deadline, where: str) -> tuple[str, int]:
    """Copy `plugin.wasm` out of a verified tar+gzip layer into `out`, at most `cap` bytes;
    return its (sha256 hex, size)."""
    found: tuple[str, int] | None = None
    try:
        with open(blob, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as inflated:
            stream = _InflateCap(inflated, 2 * cap + _TAR_SLACK, deadline, where)
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                for count, member in enumerate(tar):
                    if count >= _MAX_TAR_MEMBERS:
                        raise NotWasmError(f"{where}: more than {_MAX_TAR_MEMBERS} tar members")
                    if member.name not in _PLUGIN_NAMES:
                        if posixpath.normpath(member.name).lstrip("/") == "plugin.wasm":
                            raise NotWasmError(
                                f"{where}: tar member {member.name!r} names plugin.wasm absolutely or "
                                "indirectly (expected exactly 'plugin.wasm' or './plugin.wasm')"
                            )
                        continue
                    if not member.isfile():
                        raise NotWasmError(f"{where}: tar member {member.name!r} is not a regular file")
                    if found is not None:
                        raise NotWasmError(f"{where}: the layer holds plugin.wasm more than once")
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file always has content
                    found = _copy_capped(source, out, cap, deadline, where)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile):
        raise NotWasmError(f"{where}: layer is not a valid tar+gzip archive") from None
    if found is None:
        raise NotWasmError(f"{where}: tar+gzip layer holds no plugin.wasm")
    return found


def _copy_capped(source: IO[bytes], out: IO[bytes], cap: int, deadline: Deadline, where: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    while chunk := source.read(256 << 10):
        total += len(chunk)
        if total > cap:
            raise TooLargeError(f"{where}: plugin.wasm is more than the cap of {cap} bytes")
        digest.update(chunk)
        out.write(chunk)
        deadline.check(f"unpacking plugin.wasm from {where}")
    return digest.hexdigest(), total


@dataclass(frozen=True)
class PushResult:
    manifest_digest: str
    index_digest: str | None


def push_image(
    module_path: Path,
    reference: str,
    layout: str,
    options: FetchOptions,
    pull_secret: DockerConfig | None = None,
    with_index: bool = False,
) -> PushResult:
    """Push a module file as an image of `layout` (optionally behind an amd64+arm64 index)."""
    ref = parse_image_ref(reference)
    tag = check_ref_for_push(ref)
    try:
        with open(module_path, "rb") as handle:
            module = handle.read(options.max_module_bytes + 1)
    except OSError as exc:
        raise BadReferenceError(f"module file {module_path}: cannot read ({exc.strerror})") from None
    if len(module) > options.max_module_bytes:
        raise TooLargeError(f"module file {module_path}: more than the cap of {options.max_module_bytes} bytes")
    problem = structure_problem(module)
    if problem is not None:
        raise NotWasmError(f"module file {module_path}: not a WebAssembly module ({problem})")
    image = build_image(module, layout)
    credentials = resolve_credentials(ref.registry, pull_secret, options.environ)
    with (
        Deadline(options.deadline, f"push to {ref}") as deadline,
        RegistryClient(ref, credentials, options, deadline) as client,
        naming_the_credential_store(ref.registry, credentials, pull_secret, options.environ),
    ):
        for blob in image.blobs:
            client.push_blob(blob)
        if not with_index:
            return PushResult(client.push_manifest(tag, image.manifest, image.media_type), None)
        digest = client.push_manifest(
            "sha256:" + hashlib.sha256(image.manifest).hexdigest(), image.manifest, image.media_type
        )
        index = build_index(image.manifest, image.media_type, (("linux", "arm64"), ("linux", "amd64")))
        return PushResult(digest, client.push_manifest(tag, index, OCI_INDEX))
