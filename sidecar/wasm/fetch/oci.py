"""A small OCI registry client for a puller of untrusted modules (why not oras-py as is:
docs/wasm-fetcher.md):

* every call has a timeout and the whole pull one deadline, token requests and slow bodies included;
* every URL is HTTPS or on a host marked insecure, redirects and token realms included (transfer.py);
* a refused credential fails at once with one line; a 401 carrying `insufficient_scope` gets a fresh
  token for the new scope (the token flow itself is bearer.py);
* manifests and error bodies are read with a size cap, manifests verified against the requested
  digest, the index descriptor and `Docker-Content-Digest`; blobs are streamed through sha256 + size
  checks;
* the module layer is picked by media type, an image index is resolved to linux/amd64.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import requests

from sidecar.wasm.fetch.auth import Credentials
from sidecar.wasm.fetch.bearer import Challenge, fetch_token
from sidecar.wasm.fetch.errors import (
    AuthError,
    BadReferenceError,
    FetchError,
    IntegrityError,
    NotFoundError,
    TooLargeError,
    UnavailableError,
    UnsupportedMediaTypeError,
)
from sidecar.wasm.fetch.reference import ImageRef, normalize_sha256
from sidecar.wasm.fetch.transfer import Deadline, FetchOptions, Progress, new_session, read_capped, stream_verified

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "DOCKER_TAR_GZIP",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "OCI_TAR_GZIP",
    "WASM_LAYER",
    "Descriptor",
    "RegistryClient",
    "ResolvedImage",
    "check_ref_for_push",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
# The CNCF "wasm OCI artifact" layer type; the same single-layer shape, so we take it too.
_WASM_LAYERS = (WASM_LAYER, "application/vnd.wasm.content.layer.v1+wasm")
OCI_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
_TAR_GZIP_LAYERS = (OCI_TAR_GZIP, DOCKER_TAR_GZIP)
_INDEXES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor, validated: sha256 digest and a non-negative size."""

    media_type: str
    digest: str
    size: int

    @property
    def hex(self) -> str:
        return self.digest[len("sha256:") :]

    @classmethod
    def parse(cls, raw: Any, where: str) -> Descriptor:
        if not isinstance(raw, Mapping):
            raise UnsupportedMediaTypeError(f"{where}: expected a descriptor object")
        media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise UnsupportedMediaTypeError(f"{where}: digest {digest!r} is not a sha256 digest")
        hex_digest = normalize_sha256(digest, f"{where} digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UnsupportedMediaTypeError(f"{where}: size {size!r} is not a non-negative integer")
        return cls(str(media_type or ""), "sha256:" + hex_digest, size)


@dataclass(frozen=True)
class ResolvedImage:
    """What a reference points at: the digest it resolved to (an index's, if it is one), the
    platform manifest's digest (what EG compares the user's sha256 with), and the module layer."""

    ref: ImageRef
    top_digest: str
    manifest_digest: str
    layer: Descriptor
    layout: str  # "oci" or "compat"


class RegistryClient:
    """Talks to one registry for one repository, within one deadline."""

    def __init__(
        self, ref: ImageRef, credentials: Credentials | None, options: FetchOptions, deadline: Deadline
    ) -> None:
        self.ref = ref
        self._options = options
        self._deadline = deadline
        self._credentials = credentials
        insecure = options.is_insecure(ref.api_host)
        self._session = new_session(deadline, options)
        self._base = f"{'http' if insecure else 'https'}://{ref.api_host}/v2/{ref.repository}"
        # A loopback registry not listed: HTTPS first, plain HTTP if it does not speak TLS (as docker does).
        self._plain_fallback = options.named_loopback(ref.api_host)
        self._fell_back = False
        self._authorization: str | None = None

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests and auth ---

    def request(
        self,
        method: str,
        url_or_path: str,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        stream: bool = False,
        ok: tuple[int, ...] = (200,),
    ) -> requests.Response:
        """One registry call, answering at most one auth challenge; raises on any status not in `ok`."""
        response = self._send(method, self._url(url_or_path), headers, data, stream, what)
        if response.status_code == 401:
            challenge = Challenge.parse(response.headers.get("WWW-Authenticate", ""))
            response.close()
            self._answer_challenge(challenge, what)
            response = self._send(method, self._url(url_or_path), headers, data, stream, what)
            if response.status_code == 401:
                detail = Challenge.parse(response.headers.get("WWW-Authenticate", "")).error
                response.close()
                raise AuthError(f"{what}: {self._who()} not authorized{detail}")
        if response.status_code not in ok:
            self._raise_status(response, what)
        return response

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        data: bytes | None,
        stream: bool,
        what: str,
    ) -> requests.Response:
        sent = dict(headers or {})
        if self._authorization is not None:
            sent["Authorization"] = self._authorization
        try:
            return self._session.request(method, url, headers=sent, data=data, stream=stream)
        except requests.exceptions.SSLError as exc:
            plain = self._without_tls(url)
            if plain is None:
                raise self._failure(url, what, exc) from None
            return self._send(method, plain, headers, data, stream, what)
        except requests.RequestException as exc:
            raise self._failure(url, what, exc) from None

    def _url(self, url_or_path: str) -> str:
        """A path under the repository, or an absolute URL (moved to plain HTTP with the registry, if it was)."""
        if "://" not in url_or_path:
            return f"{self._base}/{url_or_path}"
        https = f"https://{self.ref.api_host}/"
        if self._fell_back and url_or_path.startswith(https):
            return "http://" + url_or_path.removeprefix("https://")
        return url_or_path

    def _without_tls(self, url: str) -> str | None:
        """The plain-HTTP URL to retry a loopback registry's failed TLS call on, once; None otherwise."""
        https = f"https://{self.ref.api_host}/"
        if not (self._plain_fallback and url.startswith(https)):
            return None
        self._plain_fallback, self._fell_back = False, True
        self._base = "http" + self._base.removeprefix("https")
        self._options = self._options.trusting(self.ref.api_host)  # this registry only, not its redirects
        self._session.close()
        self._session = new_session(self._deadline, self._options)
        return "http://" + url.removeprefix("https://")

    def _failure(self, url: str, what: str, exc: requests.RequestException) -> FetchError:
        """A failed call as the error to raise."""
        host = urllib.parse.urlsplit(url).netloc
        if self._deadline.passed:
            return self._deadline.error(f"waiting for {host} to answer for {what}")
        if isinstance(exc, requests.exceptions.SSLError):
            return FetchError(
                f"{what}: TLS handshake with {host} failed (untrusted certificate? "
                "a plain-HTTP registry must be marked insecure with --insecure-registry)"
            )
        if isinstance(exc, requests.Timeout):
            return UnavailableError(f"{what}: {host} did not answer in time (per-call timeout)")
        what_host = f"registry {host}" if host == self.ref.api_host else host
        return UnavailableError(f"{what}: cannot reach {what_host} ({type(exc).__name__})")

    def _who(self) -> str:
        if self._credentials is None:
            return "anonymous access"
        return f"user {self._credentials.username!r} from {self._credentials.source}"

    def _answer_challenge(self, challenge: Challenge, what: str) -> None:
        if challenge.scheme == "basic":
            if self._credentials is None:
                raise AuthError(f"{what}: registry {self.ref.api_host} requires credentials and none were given")
            if self._authorization is not None:
                raise AuthError(f"{what}: registry {self.ref.api_host} rejected {self._who()}")
            self._authorization = self._credentials.basic_header()
            return
        if challenge.scheme != "bearer":
            scheme = challenge.scheme or "none"
            raise AuthError(f"{what}: registry {self.ref.api_host} asks for unsupported auth {scheme!r}")
        # Always a new token: a 401 while holding one means its scope is too narrow (or it expired).
        token = fetch_token(
            self._session, challenge, self._credentials, self._options, self._deadline, what, self._who()
        )
        self._authorization = f"Bearer {token}"

    def _raise_status(self, response: requests.Response, what: str) -> None:
        status = response.status_code
        try:
            body = read_capped(response, self._options.max_error_bytes, f"error body of {what}", self._deadline)
        except FetchError:
            body = b""
        finally:
            response.close()
        codes = _error_codes(body)
        detail = f" ({', '.join(codes)})" if codes else ""
        if status == 404:
            raise NotFoundError(f"{what}: not found on {self.ref.api_host}{detail}")
        if status == 403:
            raise AuthError(f"{what}: {self._who()} is not allowed{detail}")
        if status >= 500 or status == 429:
            raise UnavailableError(f"{what}: registry {self.ref.api_host} answered HTTP {status}{detail}")
        raise FetchError(f"{what}: registry {self.ref.api_host} answered HTTP {status}{detail}")

    # --- pulling ---

    def get_manifest(self, reference: str, expected: Descriptor | None = None) -> tuple[dict[str, Any], str, str]:
        """Fetch and verify one manifest; return (document, media type, digest)."""
        what = (
            f"manifest {self.ref.name}:{reference}" if ":" not in reference else f"manifest {self.ref.name}@{reference}"
        )
        accept = ", ".join((*_MANIFESTS, *_INDEXES))
        response = self.request("GET", f"manifests/{reference}", what=what, headers={"Accept": accept}, stream=True)
        with response:
            cap = self._options.max_manifest_bytes
            if expected is not None:
                if expected.size > cap:
                    raise TooLargeError(f"{what}: descriptor says {expected.size} bytes, more than the cap of {cap}")
                cap = expected.size
            body = read_capped(response, cap, what, self._deadline)
            content_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
            header_digest = response.headers.get("Docker-Content-Digest")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"{what}: content has {digest}, not the digest that was asked for")
        if expected is not None and (digest != expected.digest or len(body) != expected.size):
            raise IntegrityError(
                f"{what}: content does not match its descriptor in the index ({digest}, {len(body)} bytes)"
            )
        if header_digest and header_digest != digest:
            raise IntegrityError(f"{what}: Docker-Content-Digest says {header_digest}, content has {digest}")
        try:
            document = json.loads(body)
        except ValueError:
            raise UnsupportedMediaTypeError(f"{what}: not JSON") from None
        if not isinstance(document, dict):
            raise UnsupportedMediaTypeError(f"{what}: not a JSON object")
        media_type = str(document.get("mediaType") or content_type)
        return document, media_type, digest

    def resolve(self) -> ResolvedImage:
        """Reference -> verified manifest (through an index if needed) -> the module layer."""
        document, media_type, top_digest = self.get_manifest(self.ref.reference)
        manifest_digest = top_digest
        if media_type in _INDEXES:
            chosen = _pick_platform(document, f"index {self.ref}")
            document, media_type, manifest_digest = self.get_manifest(chosen.digest, expected=chosen)
        if media_type not in _MANIFESTS:
            raise UnsupportedMediaTypeError(
                f"image {self.ref}: manifest media type {media_type!r} is not an OCI or Docker image manifest"
            )
        layer, layout = _pick_layer(document, f"image {self.ref}")
        cap = self._options.max_module_bytes
        if layer.size > cap:
            raise TooLargeError(f"image {self.ref}: module layer has {layer.size} bytes, cap is {cap}")
        return ResolvedImage(self.ref, top_digest, manifest_digest, layer, layout)

    def download_blob(self, layer: Descriptor, out: IO[bytes], progress: Progress | None = None) -> None:
        what = f"blob {self.ref.name}@{layer.digest}"
        response = self.request("GET", f"blobs/{layer.digest}", what=what, stream=True)
        with response:
            stream_verified(
                response,
                out,
                what=what,
                cap=self._options.max_module_bytes,
                deadline=self._deadline,
                expected_size=layer.size,
                expected_sha256=layer.hex,
                progress=progress,
            )

    # --- pushing (test images and users' own images) ---

    def push_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        what = f"upload of blob {digest} to {self.ref.name}"
        head = self.request("HEAD", f"blobs/{digest}", what=what, ok=(200, 404))
        head.close()
        if head.status_code == 200:
            return digest
        start = self.request("POST", "blobs/uploads/", what=what, ok=(202,))
        start.close()
        location = start.headers.get("Location")
        if not location:
            raise FetchError(f"{what}: registry gave no upload Location")
        url = urllib.parse.urljoin(f"{self._base}/blobs/uploads/", location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream"}
        self.request("PUT", url, what=what, headers=headers, data=data, ok=(201,)).close()
        return digest

    def push_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        what = f"upload of manifest {self.ref.name}:{reference}"
        headers = {"Content-Type": media_type}
        self.request("PUT", f"manifests/{reference}", what=what, headers=headers, data=body, ok=(201,)).close()
        return "sha256:" + hashlib.sha256(body).hexdigest()


def _pick_platform(index: Mapping[str, Any], where: str) -> Descriptor:
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise UnsupportedMediaTypeError(f"{where}: no manifests")
    if len(entries) == 1:
        return Descriptor.parse(entries[0], f"{where} manifests[0]")
    for n, entry in enumerate(entries):
        platform = entry.get("platform") if isinstance(entry, Mapping) else None
        if isinstance(platform, Mapping) and platform.get("os") == "linux" and platform.get("architecture") == "amd64":
            return Descriptor.parse(entry, f"{where} manifests[{n}]")
    raise UnsupportedMediaTypeError(f"{where}: {len(entries)} manifests and none for linux/amd64")


def _pick_layer(manifest: Mapping[str, Any], where: str) -> tuple[Descriptor, str]:
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise UnsupportedMediaTypeError(f"{where}: manifest has no layers")
    layers = [Descriptor.parse(raw, f"{where} layers[{n}]") for n, raw in enumerate(raw_layers)]
    wasm = [layer for layer in layers if layer.media_type in _WASM_LAYERS]
    if len(wasm) == 1:
        return wasm[0], "oci"
    if len(wasm) > 1:
        raise UnsupportedMediaTypeError(f"{where}: {len(wasm)} Wasm layers, expected exactly one")
    tars = [layer for layer in layers if layer.media_type in _TAR_GZIP_LAYERS]
    if tars:
        return tars[-1], "compat"  # the compat spec puts plugin.wasm in the last tar+gzip layer
    seen = sorted({layer.media_type for layer in layers})
    raise UnsupportedMediaTypeError(
        f"{where}: no Wasm layer ({WASM_LAYER}) and no tar+gzip layer; layer media types: {', '.join(seen)}"
    )


def _error_codes(body: bytes) -> list[str]:
    try:
        errors = json.loads(body).get("errors", [])
    except (ValueError, AttributeError):
        return []
    if not isinstance(errors, list):
        return []
    return [str(e.get("code")) for e in errors[:5] if isinstance(e, Mapping) and e.get("code")]


def check_ref_for_push(ref: ImageRef) -> str:
    """The tag to push to; pushing to a digest reference makes no sense."""
    if ref.digest is not None:
        raise BadReferenceError(f"image reference {ref}: push needs a tag, not a digest")
    assert ref.tag is not None
    return ref.tag
