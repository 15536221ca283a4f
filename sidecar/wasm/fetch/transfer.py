"""What the OCI and HTTP fetchers share: options, an overall deadline, a session whose every call has a
timeout, and a streaming copy that checks size and sha256 as bytes arrive.

Sizes and digests declared by the server are only ever compared against, never used to allocate:
EG's CVE-2026-53717 came from `make([]byte, h.Size)` on an attacker's tar header.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import requests
import requests.adapters

from sidecar.wasm.fetch.errors import IntegrityError, TooLargeError, UnavailableError

__all__ = [
    "DEFAULT_MAX_MODULE_BYTES",
    "WASM_MAGIC",
    "Deadline",
    "FetchOptions",
    "Progress",
    "new_session",
    "read_capped",
    "stream_verified",
]

DEFAULT_MAX_MODULE_BYTES = 256 << 20  # EG's maxWasmSize
WASM_MAGIC = b"\0asm"
_CHUNK = 256 << 10

# Called with (bytes so far, total if known).
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class FetchOptions:
    """Limits and trust settings for one fetch; the defaults follow EG where EG has one."""

    request_timeout: float = 15.0
    deadline: float = 300.0
    max_module_bytes: int = DEFAULT_MAX_MODULE_BYTES
    max_manifest_bytes: int = 4 << 20
    insecure_hosts: frozenset[str] = frozenset()
    ca_bundle: str | None = None
    http_retries: int = 5
    environ: Mapping[str, str] | None = field(default=None, repr=False)

    def is_insecure(self, host: str) -> bool:
        """Plain HTTP is allowed only for hosts the user listed (`host:port` or bare `host`)."""
        return host in self.insecure_hosts or host.rsplit(":", 1)[0] in self.insecure_hosts


class Deadline:
    """An overall time budget; each network call gets min(per-call timeout, what is left)."""

    def __init__(self, seconds: float, what: str) -> None:
        self._seconds = seconds
        self._end = time.monotonic() + seconds
        self._what = what

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def check(self) -> None:
        if self.remaining() <= 0:
            raise UnavailableError(f"{self._what}: gave up after the overall deadline of {self._seconds:g} s")

    def timeout(self, per_call: float) -> float:
        self.check()
        return min(per_call, self.remaining())


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """Gives every request on the session a timeout, including the ones oras-py makes without one
    (its token requests), and never retries on its own: retries are the callers' decision."""

    def __init__(self, deadline: Deadline, per_call: float) -> None:
        super().__init__(max_retries=0)
        self._deadline = deadline
        self._per_call = per_call

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._deadline.timeout(self._per_call)
        return super().send(request, *args, **kwargs)


def new_session(deadline: Deadline, options: FetchOptions, session: requests.Session | None = None) -> requests.Session:
    """Fit `session` (or a new one) with deadline-bound timeouts and the CA bundle."""
    session = session if session is not None else requests.Session()
    adapter = _DeadlineAdapter(deadline, options.request_timeout)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.trust_env = False  # proxies and netrc from the environment would change where credentials go
    if options.ca_bundle is not None:
        session.verify = options.ca_bundle
    return session


def read_capped(response: requests.Response, cap: int, what: str, deadline: Deadline) -> bytes:
    """The whole body of a small response (manifest, error document), refusing more than `cap` bytes."""
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise TooLargeError(f"{what}: server declares {declared} bytes, more than the cap of {cap}")
    parts: list[bytes] = []
    total = 0
    try:
        for chunk in response.iter_content(chunk_size=64 << 10):
            total += len(chunk)
            if total > cap:
                raise TooLargeError(f"{what}: more than the cap of {cap} bytes")
            parts.append(chunk)
            deadline.check()
    except requests.RequestException as exc:
        raise UnavailableError(f"{what}: connection failed while reading ({type(exc).__name__})") from None
    return b"".join(parts)


def stream_verified(
    response: requests.Response,
    out: IO[bytes],
    *,
    what: str,
    cap: int,
    deadline: Deadline,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    progress: Progress | None = None,
) -> tuple[str, int]:
    """Copy the body to `out`, hashing it; return (sha256 hex, size). Fails on more bytes than the
    descriptor or the cap allows, on fewer than declared, and on a digest that does not match."""
    limit = cap if expected_size is None else min(cap, expected_size)
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        _raise_oversize(what, int(declared), cap, expected_size)
    total_hint = (
        expected_size if expected_size is not None else (int(declared) if declared and declared.isdigit() else None)
    )
    digest = hashlib.sha256()
    size = 0
    try:
        for chunk in response.iter_content(chunk_size=_CHUNK):
            size += len(chunk)
            if size > limit:
                _raise_oversize(what, size, cap, expected_size)
            digest.update(chunk)
            out.write(chunk)
            if progress is not None:
                progress(size, total_hint)
            deadline.check()
    except requests.RequestException as exc:
        raise UnavailableError(f"{what}: connection failed after {size} bytes ({type(exc).__name__})") from None
    if expected_size is not None and size != expected_size:
        raise IntegrityError(f"{what}: got {size} bytes, the descriptor says {expected_size}")
    actual = digest.hexdigest()
    if expected_sha256 is not None and actual != expected_sha256:
        raise IntegrityError(f"{what}: content has sha256:{actual}, the descriptor says sha256:{expected_sha256}")
    return actual, size


def _raise_oversize(what: str, size: int, cap: int, expected_size: int | None) -> None:
    if expected_size is not None and size > expected_size and expected_size <= cap:
        raise IntegrityError(f"{what}: more than the {expected_size} bytes its descriptor declares")
    raise TooLargeError(f"{what}: more than the cap of {cap} bytes")
