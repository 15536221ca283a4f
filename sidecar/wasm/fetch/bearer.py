"""The Docker registry token flow: a `WWW-Authenticate: Bearer` challenge in, a bearer token out.

What we trust, and why:

* The realm must be HTTPS, or plain HTTP to a host the user marked insecure (`host:port`, or a bare
  host for all its ports). Comparing host names only would send Basic credentials in clear text to
  any port of the registry's machine. An HTTPS realm may be on another host (Docker Hub's is
  auth.docker.io): a registry that wanted the credentials could ask for Basic auth directly, so
  naming another TLS-verified host gives it nothing more.
* The reply is read with a size cap, within the pull's deadline, and must be a JSON object with a
  `token` or `access_token` that is a well-formed bearer token; anything else is one AuthError line.
  Redirects are not followed: a token endpoint has no reason to send credentials elsewhere.
* Neither credentials nor tokens ever appear in a message.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass

import requests

from sidecar.wasm.fetch.auth import Credentials
from sidecar.wasm.fetch.errors import AuthError, FetchError, UnavailableError
from sidecar.wasm.fetch.transfer import Deadline, FetchOptions, check_transport, read_capped, shown_url

__all__ = ["Challenge", "fetch_token"]

_PARAM = re.compile(r'([A-Za-z]+)="([^"]*)"')
# RFC 6750 b64token: what may follow "Bearer " in a header.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_RETRYABLE = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Challenge:
    """A parsed `WWW-Authenticate` header: the scheme (lower case) and its quoted parameters."""

    scheme: str
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge:
        scheme = header.strip().split(" ", 1)[0].lower()
        return cls(scheme, {key.lower(): value for key, value in _PARAM.findall(header)})

    @property
    def error(self) -> str:
        """The challenge's `error` parameter as a message suffix, or ''."""
        error = self.params.get("error")
        return f" ({error})" if error else ""


def fetch_token(
    session: requests.Session,
    challenge: Challenge,
    credentials: Credentials | None,
    options: FetchOptions,
    deadline: Deadline,
    what: str,
    who: str,
) -> str:
    """Ask the challenge's realm for a token (with Basic credentials if we have some); the token."""
    realm = challenge.params.get("realm", "")
    parsed = urllib.parse.urlsplit(realm)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise AuthError(f"{what}: the registry's token realm {shown_url(realm)!r} is not an http(s) URL")
    try:
        check_transport(realm, options)
    except FetchError:
        raise AuthError(
            f"{what}: refusing to ask token realm {shown_url(realm)} for a token over plain HTTP "
            "(not HTTPS, and its host:port is not marked insecure)"
        ) from None
    endpoint = f"token endpoint {shown_url(realm)}"
    params = {key: challenge.params[key] for key in ("service", "scope") if challenge.params.get(key)}
    headers = {"Accept": "application/json"}
    if credentials is not None:
        headers["Authorization"] = credentials.basic_header()
    try:
        response = session.get(realm, params=params, headers=headers, stream=True, allow_redirects=False)
    except requests.RequestException as exc:
        if deadline.passed:
            raise deadline.error(f"asking the {endpoint} for a token") from None
        if isinstance(exc, requests.Timeout):
            raise UnavailableError(f"{what}: the {endpoint} did not answer within the per-call timeout") from None
        raise UnavailableError(f"{what}: cannot reach the {endpoint} ({type(exc).__name__})") from None
    with response:
        status = response.status_code
        if status in (401, 403):
            raise AuthError(f"{what}: the {endpoint} refused {who} (HTTP {status})")
        if status in _RETRYABLE:
            raise UnavailableError(f"{what}: the {endpoint} answered HTTP {status}")
        if status != 200:
            raise AuthError(f"{what}: the {endpoint} answered HTTP {status}, expected 200 with a token")
        body = read_capped(response, options.max_token_bytes, f"reply of the {endpoint}", deadline)
    return _parse_token(body, f"{what}: the {endpoint}")


def _parse_token(body: bytes, where: str) -> str:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise AuthError(f"{where} sent a reply that is not JSON") from None
    if not isinstance(document, dict):
        raise AuthError(f"{where} sent JSON that is not an object with a 'token'")
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise AuthError(f"{where} sent no usable token (expected a string 'token' or 'access_token')")
    return token
