"""Fetching a module body from an HTTP(S) URL: size cap, overall deadline, retries only on errors
that can go away (connection failures, timeouts, 429 and 5xx), optional CA bundle. Plain `http://`
only for hosts the user marked insecure, for the URL and for every redirect it leads to."""

from __future__ import annotations

import hashlib
import time
import urllib.parse
from typing import IO

import requests

from sidecar.wasm.fetch.errors import (
    AuthError,
    BadReferenceError,
    FetchError,
    NotFoundError,
    UnavailableError,
)
from sidecar.wasm.fetch.transfer import Deadline, FetchOptions, Progress, new_session, shown_url, stream_verified

__all__ = ["check_url", "fetch_url", "shown_url", "url_key"]

_RETRYABLE = frozenset({429, 500, 502, 503, 504})
_BACKOFF_BASE = 0.2
_BACKOFF_MAX = 5.0


def url_key(url: str) -> str:
    """A cache key for a URL that names it without storing its query string in clear."""
    query = urllib.parse.urlsplit(url).query
    suffix = "?" + hashlib.sha256(query.encode()).hexdigest()[:16] if query else ""
    return f"http:{shown_url(url)}{suffix}"


def check_url(url: str, options: FetchOptions) -> urllib.parse.SplitResult:
    parsed = urllib.parse.urlsplit(url)
    if parsed.username or parsed.password:
        raise BadReferenceError("URL: credentials in the URL are not supported (they would end up in logs)")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BadReferenceError(f"URL {shown_url(url)!r}: expected https://host/path")
    if parsed.scheme == "http" and not options.is_insecure(parsed.netloc):
        raise BadReferenceError(f"URL {shown_url(url)}: plain http is allowed only for hosts marked insecure")
    return parsed


def fetch_url(
    url: str, out: IO[bytes], options: FetchOptions, deadline: Deadline, progress: Progress | None = None
) -> tuple[str, int]:
    """Download `url` into `out` (rewound on each retry); return (sha256 hex, size)."""
    check_url(url, options)
    what = f"URL {shown_url(url)}"
    with new_session(deadline, options) as session:
        attempt = 0
        while True:
            try:
                return _attempt(session, url, out, options, deadline, progress, what)
            except UnavailableError:
                attempt += 1
                pause = min(_BACKOFF_MAX, _BACKOFF_BASE * 2**attempt)
                if attempt > options.http_retries or deadline.remaining() <= pause:
                    raise
                time.sleep(pause)  # backoff between retries, not synchronisation
                out.seek(0)
                out.truncate()


def _attempt(
    session: requests.Session,
    url: str,
    out: IO[bytes],
    options: FetchOptions,
    deadline: Deadline,
    progress: Progress | None,
    what: str,
) -> tuple[str, int]:
    try:
        response = session.get(url, stream=True)
    except requests.exceptions.SSLError:
        raise FetchError(f"{what}: TLS verification failed (pass a CA bundle for a private CA)") from None
    except requests.RequestException as exc:
        if deadline.passed:
            raise deadline.error(f"waiting for {what}") from None
        if isinstance(exc, requests.Timeout):
            raise UnavailableError(f"{what}: no answer within the per-call timeout") from None
        raise UnavailableError(f"{what}: cannot connect ({type(exc).__name__})") from None
    with response:
        status = response.status_code
        if status in _RETRYABLE:
            raise UnavailableError(f"{what}: server answered HTTP {status}")
        if status == 404:
            raise NotFoundError(f"{what}: not found (HTTP 404)")
        if status in (401, 403):
            raise AuthError(f"{what}: access denied (HTTP {status})")
        if status != 200:
            raise FetchError(f"{what}: server answered HTTP {status}, expected 200")
        return stream_verified(
            response, out, what=what, cap=options.max_module_bytes, deadline=deadline, progress=progress
        )
