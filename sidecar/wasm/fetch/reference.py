"""Image references (`[oci://]host[:port]/path[:tag][@sha256:hex]`) and sha256 digests.

We parse references ourselves instead of through oras-py's `Container` so that errors are ours (one
line naming the value), `oci://` is accepted, and a tag-less reference means `:latest` exactly as
Envoy Gateway's EnvoyExtensionPolicy does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.wasm.fetch.errors import BadReferenceError

__all__ = ["DEFAULT_REGISTRY", "ImageRef", "normalize_sha256", "parse_image_ref"]

DEFAULT_REGISTRY = "docker.io"
# Docker Hub's API lives on another host than its name; every other registry serves both.
_API_HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?")
_HEX64 = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference; `tag` is None only when a digest is given without a tag."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        return _API_HOSTS.get(self.registry, self.registry)

    @property
    def name(self) -> str:
        """The image without tag or digest: the part of the cache key EG calls the module name."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after `/manifests/`: the digest when there is one (immutable), else the tag."""
        if self.digest is not None:
            return self.digest
        assert self.tag is not None
        return self.tag

    @property
    def is_latest(self) -> bool:
        return self.digest is None and self.tag == "latest"

    def with_digest(self, digest: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def normalize_sha256(value: str, what: str = "sha256") -> str:
    """Accept `hex` or `sha256:hex` (64 lower-case hex digits); return the bare hex."""
    text = value.strip()
    if text.startswith("sha256:"):
        text = text[len("sha256:") :]
    if not _HEX64.fullmatch(text):
        raise BadReferenceError(f"{what} {value!r}: expected 64 lower-case hex digits, optionally 'sha256:'")
    return text


def parse_image_ref(text: str) -> ImageRef:
    """Parse an image reference; a reference with neither tag nor digest gets `:latest`."""
    original = text
    if text.startswith("oci://"):
        text = text[len("oci://") :]
    if not text or any(c.isspace() for c in text):
        raise BadReferenceError(f"image reference {original!r}: expected [oci://]host/repository[:tag][@sha256:...]")
    digest: str | None = None
    if "@" in text:
        text, _, raw_digest = text.partition("@")
        if not raw_digest.startswith("sha256:"):
            raise BadReferenceError(f"image reference {original!r}: only sha256 digests are supported")
        digest = "sha256:" + normalize_sha256(raw_digest, f"digest in image reference {original!r}")
    first, slash, rest = text.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, rest
        if not _HOST.fullmatch(registry):
            raise BadReferenceError(f"image reference {original!r}: bad registry host {registry!r}")
    else:
        registry, path = DEFAULT_REGISTRY, text
    tag: str | None = None
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        path, tag = path[:colon], path[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise BadReferenceError(f"image reference {original!r}: bad tag {tag!r}")
    if not path or not all(_COMPONENT.fullmatch(part) for part in path.split("/")):
        raise BadReferenceError(
            f"image reference {original!r}: bad repository {path!r} (lower-case letters, digits, . _ - /)"
        )
    if registry in _API_HOSTS and "/" not in path:
        path = f"library/{path}"
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry, path, tag, digest)
