"""Pull a module into the cache with Envoy Gateway's semantics.

* Image: the user's sha256 must equal the **manifest digest** (the index's or the platform
  manifest's: EG compares the platform image's, and accepting the index digest too lets users pin
  the digest they pushed); an `@sha256:` in the reference pins it as well.
* HTTP: the user's sha256 must equal the **body**.
* Either way the module's own sha256 names the cache file and is what Envoy is told.
* pullPolicy matters only when nothing is pinned; the default is Always for `:latest` images and
  IfNotPresent otherwise. A pinned source that is cached never touches the network.

A module is verified in a temp file (digests, size, then Wasm validation) and only then renamed
into the cache: a failed pull leaves nothing behind. A cache hit is verified again before it is
handed out (cache.py); a module that fails is removed and fetched again, and if that fetch fails
too, its error says the cached copy was thrown away.
"""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client import Counter

from sidecar.wasm.fetch.auth import DockerConfig, naming_the_credential_store, resolve_credentials
from sidecar.wasm.fetch.binary import check_module
from sidecar.wasm.fetch.cache import CachedModule, ModuleCache
from sidecar.wasm.fetch.errors import (
    BadReferenceError,
    CacheError,
    ChecksumMismatchError,
    FetchError,
)
from sidecar.wasm.fetch.http import check_url, fetch_url, shown_url, url_key
from sidecar.wasm.fetch.layout import extract_plugin
from sidecar.wasm.fetch.oci import RegistryClient
from sidecar.wasm.fetch.reference import ImageRef, normalize_sha256, parse_image_ref
from sidecar.wasm.fetch.transfer import Deadline, FetchOptions, Progress

__all__ = ["POLICIES", "ModuleFetcher", "PullResult"]

POLICIES = ("Always", "IfNotPresent")

# EG's metric names and labels (internal/wasm/metrics.go); failures are labelled by FetchError.reason.
CACHE_LOOKUPS = Counter("wasm_cache_lookup", "Wasm module cache lookups, by whether they hit.", ["hit"])
REMOTE_FETCHES = Counter("wasm_remote_fetch", "Failed remote Wasm module fetches, by reason.", ["reason"])


@dataclass(frozen=True)
class PullResult:
    """The module (its `source` is the reference or URL this pull asked for), whether the cache had it,
    and an image's layout ("oci" / "compat"; recorded in the cache, so hits know it too)."""

    module: CachedModule
    cache_hit: bool

    @property
    def layout(self) -> str | None:
        return self.module.layout


@dataclass
class ModuleFetcher:
    """Fetches into one cache with one set of options; cheap to create, safe to share across threads
    (each pull has its own session and deadline)."""

    cache: ModuleCache
    options: FetchOptions = field(default_factory=FetchOptions)

    # --- images ---

    def pull_image(
        self,
        url: str,
        *,
        sha256: str | None = None,
        policy: str | None = None,
        pull_secret: DockerConfig | None = None,
        progress: Progress | None = None,
    ) -> PullResult:
        ref = parse_image_ref(url)
        want = "sha256:" + normalize_sha256(sha256) if sha256 else None
        policy = _policy(policy, ref.is_latest)
        pins = sorted({d for d in (ref.digest, want) if d is not None})
        keys = [_image_key(ref, d) for d in pins]
        if not pins and policy == "IfNotPresent":
            keys = [_tag_key(ref)]
        hit, evicted = self._lookup(keys)
        if hit is not None:
            return PullResult(replace(hit, source=str(ref)), True)
        lock_key = _image_key(ref, pins[0]) if pins else _tag_key(ref)
        try:
            with (
                Deadline(self.options.deadline, f"pull of {ref}") as deadline,
                self.cache.fetch_lock(lock_key, time.monotonic() + deadline.remaining()),
            ):
                found = self.cache.find(keys)
                if found.module is not None:  # another process fetched it while we waited
                    return PullResult(replace(found.module, source=str(ref)), True)
                return self._fetch_image(ref, want, pull_secret, deadline, progress)
        except FetchError as exc:
            REMOTE_FETCHES.labels(reason=exc.reason).inc()
            raise _after_eviction(exc, evicted) from None

    def _fetch_image(
        self,
        ref: ImageRef,
        want: str | None,
        pull_secret: DockerConfig | None,
        deadline: Deadline,
        progress: Progress | None,
    ) -> PullResult:
        credentials = resolve_credentials(ref.registry, pull_secret, self.options.environ)
        with RegistryClient(ref, credentials, self.options, deadline) as client:
            with naming_the_credential_store(ref.registry, credentials, pull_secret, self.options.environ):
                image = client.resolve()
            if want is not None and want not in (image.top_digest, image.manifest_digest):
                raise ChecksumMismatchError(
                    f"image {ref}: manifest digest is {image.manifest_digest}, but sha256 says {want}"
                )
            keys = sorted({_image_key(ref, image.top_digest), _image_key(ref, image.manifest_digest)})
            if ref.digest is None:
                keys.append(_tag_key(ref))
            known = self.cache.lookup([_image_key(ref, image.manifest_digest)])
            if known is not None:  # Always on an unchanged tag, or another tag of it: nothing to download
                module = self.cache.store_keys(known, keys, str(ref), image.layout)
                return PullResult(module, True)
            with self.cache.temp_file() as (blob_path, blob):
                client.download_blob(image.layer, blob, progress)
                blob.flush()
                where = f"image {ref}"
                if image.layout == "oci":  # the verified blob is the module: its digest is the module sha
                    sha_size = (image.layer.hex, image.layer.size)
                    module = self._publish(blob_path, sha_size, keys, image.manifest_digest, str(ref), where, "oci")
                    return PullResult(module, False)
                with self.cache.temp_file() as (wasm_path, wasm):
                    sha_size = extract_plugin(blob_path, wasm, self.options.max_module_bytes, deadline, where)
                    wasm.flush()
                    module = self._publish(
                        wasm_path, sha_size, keys, image.manifest_digest, str(ref), where, image.layout
                    )
                    return PullResult(module, False)

    # --- HTTP ---

    def pull_http(
        self,
        url: str,
        *,
        sha256: str | None = None,
        policy: str | None = None,
        progress: Progress | None = None,
    ) -> PullResult:
        options = self.options
        host = urllib.parse.urlsplit(url).netloc.rpartition("@")[2]
        if url.startswith("http://") and options.named_loopback(host):
            options = options.trusting(host)  # docker's loopback rule, for the URL's own host only
        check_url(url, options)
        key, shown = url_key(url), shown_url(url)
        want = normalize_sha256(sha256) if sha256 else None
        policy = _policy(policy, False)
        keys = [f"{key}#{want}"] if want else ([key] if policy == "IfNotPresent" else [])
        hit, evicted = self._lookup(keys)
        if hit is not None:
            return PullResult(hit, True)
        try:
            with (
                Deadline(self.options.deadline, f"fetch of {shown}") as deadline,
                self.cache.fetch_lock(key, time.monotonic() + deadline.remaining()),
            ):
                found = self.cache.find(keys)
                if found.module is not None:
                    return PullResult(found.module, True)
                with self.cache.temp_file() as (path, handle):
                    body_sha, size = fetch_url(url, handle, options, deadline, progress)
                    handle.flush()
                    if want is not None and body_sha != want:
                        raise ChecksumMismatchError(f"URL {shown}: body has sha256 {body_sha}, but sha256 says {want}")
                    keys = [f"{key}#{body_sha}", key]
                    digest = "sha256:" + body_sha
                    module = self._publish(path, (body_sha, size), keys, digest, shown, f"URL {shown}")
                    return PullResult(module, False)
        except FetchError as exc:
            REMOTE_FETCHES.labels(reason=exc.reason).inc()
            raise _after_eviction(exc, evicted) from None

    # --- shared ---

    def _lookup(self, keys: list[str]) -> tuple[CachedModule | None, str | None]:
        found = self.cache.find(keys)
        CACHE_LOOKUPS.labels(hit=str(found.module is not None).lower()).inc()
        return found.module, found.evicted

    def _publish(
        self,
        path: Path,
        sha_size: tuple[str, int],
        keys: list[str],
        digest: str,
        source: str,
        where: str,
        layout: str | None = None,
    ) -> CachedModule:
        """Validate a module whose sha256 and size were computed while it was written, then store it."""
        try:
            check_module(path, where)
        except OSError as exc:
            raise CacheError(f"{where}: cannot read the download back ({exc.strerror or exc})") from None
        sha, size = sha_size
        return self.cache.store(path, sha, size, keys, digest, source, layout)


def _after_eviction(exc: FetchError, evicted: str | None) -> FetchError:
    """The fetch error, saying also that a cached copy failed verification and was removed (so the
    user knows why a pinned or IfNotPresent source needed the network at all)."""
    if evicted is None:
        return exc
    again = type(exc)(f"{exc}; the fetch was needed because {evicted}")
    again.reason = exc.reason
    return again


def _policy(policy: str | None, is_latest: bool) -> str:
    if policy is None or policy == "":
        return "Always" if is_latest else "IfNotPresent"
    if policy not in POLICIES:
        raise BadReferenceError(f"pullPolicy {policy!r}: expected one of {', '.join(POLICIES)}")
    return policy


def _image_key(ref: ImageRef, digest: str) -> str:
    return f"image:{ref.name}@{digest}"


def _tag_key(ref: ImageRef) -> str:
    return f"image:{ref.name}:{ref.tag}"
