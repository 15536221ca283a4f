"""What the OCI and HTTP fetchers share: options, one overall deadline that every network phase
obeys, a session whose every request has a timeout and goes only to trusted transports, and bounded
body reads that check size, sha256 and the deadline as bytes arrive.

Sizes and digests declared by the server are only ever compared against, never used to allocate:
EG's CVE-2026-53717 came from `make([]byte, h.Size)` on an attacker's tar header.

Why a watchdog: a per-call timeout bounds each `recv`, not a read made of many of them. A server that
sends one byte every half second never trips a read timeout, and http.client keeps reading a header
line or a chunk until it is whole. So each socket the session opens is registered with the pull's
`Deadline`, whose timer shuts them all down when the deadline passes: whatever is blocked in a read
wakes up, and the reader reports the deadline (with the phase and the bytes received so far).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import IO, Any

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions

from sidecar.wasm.fetch.errors import (
    CacheError,
    InsecureTransportError,
    IntegrityError,
    TooLargeError,
    UnavailableError,
)

__all__ = [
    "DEFAULT_MAX_MODULE_BYTES",
    "WASM_MAGIC",
    "Deadline",
    "FetchOptions",
    "Progress",
    "iter_body",
    "new_session",
    "read_capped",
    "shown_url",
    "stream_verified",
]

DEFAULT_MAX_MODULE_BYTES = 256 << 20  # EG's maxWasmSize
WASM_MAGIC = b"\0asm"
_CHUNK = 256 << 10
_MAX_REDIRECTS = 5  # registries redirect a blob once (to object storage); more is a loop or a trap

# Called with (bytes so far, total if known).
Progress = Callable[[int, int | None], None]


class _NoQueryStrings(logging.Filter):
    """urllib3 logs each request line at DEBUG, query string and all; pre-signed URLs carry their
    credentials there. Whoever turns DEBUG on gets the path and `?<redacted>`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_query(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


def _redact_query(text: str) -> str:
    head, sep, _ = text.partition("?")
    return f"{head}?<redacted>" if sep else text


logging.getLogger("urllib3.connectionpool").addFilter(_NoQueryStrings())


@dataclass(frozen=True)
class FetchOptions:
    """Limits and trust settings for one fetch; the defaults follow EG where EG has one."""

    request_timeout: float = 15.0
    deadline: float = 300.0
    max_module_bytes: int = DEFAULT_MAX_MODULE_BYTES
    max_manifest_bytes: int = 4 << 20
    max_token_bytes: int = 256 << 10
    max_error_bytes: int = 64 << 10
    insecure_hosts: frozenset[str] = frozenset()
    ca_bundle: str | None = None
    http_retries: int = 5
    environ: Mapping[str, str] | None = field(default=None, repr=False)
    # Docker's rule: the registry (or URL host) a pull names may speak plain HTTP when it is on a loopback
    # address, unlisted: `sidecar wasm pull 127.0.0.1:5000/team/filter:v1` works as `docker pull` does
    # (a registry tries HTTPS first). Redirects and token realms elsewhere still need listing.
    loopback_plain_http: bool = True

    def is_insecure(self, host: str) -> bool:
        """Plain HTTP is allowed only for hosts the user listed (`host:port` or bare `host`)."""
        return host in self.insecure_hosts or host.rsplit(":", 1)[0] in self.insecure_hosts

    def trusting(self, host: str) -> FetchOptions:
        """These options with `host` listed as insecure."""
        return replace(self, insecure_hosts=self.insecure_hosts | {host})

    def named_loopback(self, host: str) -> bool:
        """Is `host`, named by the pull itself, a loopback host that may use plain HTTP unlisted?"""
        return self.loopback_plain_http and not self.is_insecure(host) and is_loopback(host)


def is_loopback(host: str) -> bool:
    """`127.0.0.1:5000`, `[::1]:5000`, `localhost` (any 127.0.0.0/8 or ::1, with or without a port)."""
    bare = host.rpartition("@")[2]
    if bare.startswith("["):
        bare = bare[1:].partition("]")[0]
    elif bare.count(":") == 1:
        bare = bare.partition(":")[0]
    if bare.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def shown_url(url: str) -> str:
    """The URL without query or fragment, for messages and listings: pre-signed URLs carry their
    credentials in the query string."""
    parsed = urllib.parse.urlsplit(url)
    netloc = parsed.netloc.rpartition("@")[2]  # never user:password@
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


class Deadline:
    """An overall time budget for one pull. Each request gets min(per-call timeout, what is left),
    and a watchdog shuts down the pull's sockets when it passes (see the module docstring).
    Use it as a context manager, so the watchdog stops with the pull."""

    def __init__(self, seconds: float, what: str) -> None:
        self._seconds = seconds
        self._end = time.monotonic() + seconds
        self._what = what
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer: threading.Timer | None = None
        self._fired = False
        self._closed = False

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            self._sockets.clear()

    def remaining(self) -> float:
        return self._end - time.monotonic()

    @property
    def passed(self) -> bool:
        return self._fired or self.remaining() <= 0

    def error(self, during: str) -> UnavailableError:
        return UnavailableError(f"{self._what}: gave up after the overall deadline of {self._seconds:g} s ({during})")

    def check(self, during: str = "") -> None:
        if self.passed:
            raise self.error(during or "before the next step")

    def timeout(self, per_call: float, during: str = "") -> float:
        self.check(during)
        return min(per_call, self.remaining())

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` down when the deadline passes (at once if it already has)."""
        with self._lock:
            if self._closed:
                return
            self._sockets.append(sock)
            if self._timer is None:
                self._timer = threading.Timer(max(0.0, self.remaining()), self._fire)
                self._timer.daemon = True
                self._timer.start()
            fired = self._fired
        if fired:
            _shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    # A socket object closed since knows it (its fd is -1), so this never touches a reused descriptor.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def check_transport(url: str, options: FetchOptions) -> None:
    """Every URL the session visits, redirects and token realms included: HTTPS, or plain HTTP to a
    host the user marked insecure. Anything else would let a server downgrade us to cleartext."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https":
        return
    if parsed.scheme == "http" and options.is_insecure(parsed.netloc.rpartition("@")[2]):
        return
    raise InsecureTransportError(
        f"refusing to fetch {shown_url(url)}: plain {parsed.scheme or 'unknown-scheme'} to a host not marked "
        "insecure (a server may not downgrade a transfer from HTTPS; list the host with --insecure-registry "
        "to allow it)"
    )


def _watched_pools(deadline: Deadline) -> dict[str, type[urllib3.connectionpool.HTTPConnectionPool]]:
    """Connection pools whose sockets the deadline's watchdog can shut down, TLS handshake included."""

    class Http(urllib3.connection.HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            deadline.watch(sock)
            return sock

    class Https(urllib3.connection.HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            deadline.watch(sock)
            return sock

    class HttpPool(urllib3.connectionpool.HTTPConnectionPool):
        ConnectionCls = Http

    class HttpsPool(urllib3.connectionpool.HTTPSConnectionPool):
        ConnectionCls = Https

    return {"http": HttpPool, "https": HttpsPool}


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    """Gives every request on the session a timeout within the deadline, refuses cleartext to hosts
    not marked insecure (this sees each redirect hop and the token realm too), and never retries on
    its own: retries are the callers' decision."""

    def __init__(self, deadline: Deadline, options: FetchOptions) -> None:
        self._deadline = deadline
        self._options = options
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _watched_pools(self._deadline)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        check_transport(str(request.url), self._options)
        during = f"{request.method} {shown_url(str(request.url))}"
        kwargs["timeout"] = self._deadline.timeout(self._options.request_timeout, during)
        return super().send(request, *args, **kwargs)


def new_session(deadline: Deadline, options: FetchOptions) -> requests.Session:
    """A session bound to `deadline`, trusting only `options`' CA bundle (or the system's) and
    nothing from the environment."""
    session = requests.Session()
    adapter = _GuardedAdapter(deadline, options)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.max_redirects = _MAX_REDIRECTS
    session.trust_env = False  # proxies and netrc from the environment would change where credentials go
    if options.ca_bundle is not None:
        session.verify = options.ca_bundle
    return session


def _request_timeout_errors() -> tuple[type[BaseException], ...]:
    return (urllib3.exceptions.ReadTimeoutError, requests.exceptions.ReadTimeout, TimeoutError, socket.timeout)


def iter_body(response: requests.Response, deadline: Deadline, what: str, count: list[int]) -> Iterator[bytes]:
    """The body as it arrives (each piece is what one read returned, so a byte count is exact even
    when the connection then fails); `count[0]` holds the bytes received so far. Every failure is
    one UnavailableError that says what was being read, how far it got and why it stopped."""
    raw = response.raw
    while True:
        if deadline.passed:
            raise deadline.error(f"reading {what}, {count[0]} bytes received")
        try:
            chunk = raw.read1(_CHUNK, decode_content=True)
        except Exception as exc:  # urllib3, http.client and socket errors alike: classified below
            if deadline.passed:
                raise deadline.error(f"reading {what}, {count[0]} bytes received") from None
            if isinstance(exc, _request_timeout_errors()):
                raise UnavailableError(
                    f"{what}: no data for the per-call timeout after {count[0]} bytes (read timed out)"
                ) from None
            raise UnavailableError(f"{what}: connection failed after {count[0]} bytes ({_cause_name(exc)})") from None
        if not chunk:
            # The watchdog's shutdown looks like an end of body to a response without a length.
            if deadline.passed:
                raise deadline.error(f"reading {what}, {count[0]} bytes received")
            return
        count[0] += len(chunk)
        yield chunk


def _cause_name(exc: BaseException) -> str:
    """`IncompleteRead` rather than `ProtocolError`: the innermost cause names what went wrong."""
    seen = exc
    while True:
        inner = seen.args[1] if isinstance(seen, urllib3.exceptions.ProtocolError) and len(seen.args) > 1 else None
        if not isinstance(inner, BaseException):
            return type(seen).__name__
        seen = inner


def read_capped(response: requests.Response, cap: int, what: str, deadline: Deadline) -> bytes:
    """The whole body of a small response (manifest, token, error document), refusing more than `cap`
    bytes before reading them."""
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise TooLargeError(f"{what}: server declares {declared} bytes, more than the cap of {cap}")
    parts: list[bytes] = []
    count = [0]
    for chunk in iter_body(response, deadline, what, count):
        if count[0] > cap:
            raise TooLargeError(f"{what}: more than the cap of {cap} bytes")
        parts.append(chunk)
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
    count = [0]
    for chunk in iter_body(response, deadline, what, count):
        if count[0] > limit:
            _raise_oversize(what, count[0], cap, expected_size)
        digest.update(chunk)
        try:
            out.write(chunk)
        except OSError as exc:
            raise CacheError(f"{what}: cannot write the download to the cache ({exc.strerror or exc})") from None
        if progress is not None:
            progress(count[0], total_hint)
    size = count[0]
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
