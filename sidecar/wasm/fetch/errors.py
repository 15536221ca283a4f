"""Errors of the Wasm fetcher (`sidecar.wasm.fetch`): one class per thing a user can act on.

* WasmError                         (sidecar.errors) the CLI prints its message on one line and exits 2
  + FetchError                      a module could not be fetched; `reason` is its metric label
    + BadReferenceError             an image reference, URL, digest or source spec is malformed
    + CredentialsFileError          a Docker config.json or pull-secret file cannot be used
    + AuthError                     the registry or URL refused the credentials
    + InsecureTransportError        a redirect or token realm would go over plain HTTP to an untrusted host
    + NotFoundError                 the repository, tag, digest or URL does not exist
    + UnavailableError              the server could not be reached, timed out, or kept failing
    + UnsupportedMediaTypeError     the manifest or its layers are not a Wasm image layout we know
    + IntegrityError                a manifest or blob does not match its descriptor
    + ChecksumMismatchError         the user's sha256 does not match
    + NotWasmError                  the bytes are not a WebAssembly binary
    + TooLargeError                 a manifest, blob, token reply or module is larger than the cap
  + CacheError                      the module cache cannot be used (disk full, read-only, a symlink
                                    where a directory belongs); a corrupt index or module is repaired,
                                    not reported

Each FetchError class carries `reason`, the label of `wasm_remote_fetch_total` (EG's values; counted
in fetcher.py), so the metric and the message never disagree about why a fetch failed. Messages name
the reference or file and what was expected; they never contain credentials.
"""

from __future__ import annotations

from sidecar.errors import WasmError

__all__ = [
    "AuthError",
    "BadReferenceError",
    "CacheError",
    "ChecksumMismatchError",
    "CredentialsFileError",
    "FetchError",
    "InsecureTransportError",
    "IntegrityError",
    "NotFoundError",
    "NotWasmError",
    "TooLargeError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
]


class FetchError(WasmError):
    """A module could not be fetched; `reason` is the `wasm_remote_fetch_total` label."""

    reason = "fetch_error"


class BadReferenceError(FetchError):
    """An image reference, URL, digest or source spec is malformed."""


class CredentialsFileError(FetchError):
    """A Docker config.json or Kubernetes pull-secret file cannot be used."""


class AuthError(FetchError):
    """The registry or URL refused the credentials (or wanted some and got none)."""


class InsecureTransportError(FetchError):
    """A URL, redirect or token realm would use plain HTTP to a host the user did not mark insecure."""


class NotFoundError(FetchError):
    """The repository, tag, digest or URL does not exist."""


class UnavailableError(FetchError):
    """The server could not be reached, timed out, or kept failing with retryable errors."""

    reason = "download_error"


class UnsupportedMediaTypeError(FetchError):
    """The manifest or its layers are not one of the Wasm image layouts we know."""

    reason = "manifest_error"


class IntegrityError(FetchError):
    """A manifest or blob does not match the digest or size its descriptor declares."""

    reason = "download_error"


class ChecksumMismatchError(FetchError):
    """The user's sha256 does not match the image's manifest digest or the HTTP body."""

    reason = "checksum_mismatched"


class NotWasmError(FetchError):
    """The bytes are not a valid WebAssembly binary."""

    reason = "download_error"


class TooLargeError(FetchError):
    """A manifest, blob or module is larger than the configured cap."""

    reason = "download_error"


class CacheError(WasmError):
    """The module cache cannot be used: disk full, read-only, permissions, or a symlink in its layout."""
