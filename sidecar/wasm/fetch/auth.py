"""Registry credentials: Docker `config.json`, Kubernetes pull-secret manifests, and the environment.

Precedence (first match wins): an explicit pull-secret file (a `config.json` or a Secret manifest of
type `kubernetes.io/dockerconfigjson` / `kubernetes.io/dockercfg`), then `SIDECAR_REGISTRY_USERNAME` +
`SIDECAR_REGISTRY_PASSWORD`, then `$DOCKER_CONFIG/config.json`, then `~/.docker/config.json`; with none
of them the pull is anonymous. oras-py looks only at `~/.docker/config.json` and matches hosts exactly;
we also honour `DOCKER_CONFIG` and `https://host/v1/`-style keys. Secrets never reach messages: only
the source (a file path or an env variable name) and the user name do.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.wasm.fetch.errors import AuthError, CredentialsFileError

__all__ = [
    "ENV_PASSWORD",
    "ENV_USERNAME",
    "Credentials",
    "DockerConfig",
    "load_pull_secret",
    "missing_credentials_hint",
    "naming_the_credential_store",
    "pull_secret_from_manifest",
    "resolve_credentials",
]

ENV_USERNAME = "SIDECAR_REGISTRY_USERNAME"
ENV_PASSWORD = "SIDECAR_REGISTRY_PASSWORD"
_MAX_FILE_BYTES = 1 << 20
_MAX_HELPER_NAME = 64  # a helper name is echoed in errors: keep a hostile config from flooding them
_DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or token used as password) for one registry."""

    username: str
    password: str = field(repr=False)
    source: str

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class DockerConfig:
    """The `auths` map of a Docker config, keyed by bare host[:port]."""

    auths: Mapping[str, Mapping[str, Any]]
    source: str
    helpers: Mapping[str, str] = field(default_factory=dict)  # credHelpers: host -> helper name
    store: str | None = None  # credsStore: the helper for every host not in auths

    def store_hint(self, registry: str) -> str | None:
        """Why no credentials were found for `registry` when a credential store should have had them."""
        if self.store is None or self.auths.get(registry) is not None:
            return None
        return (
            f"{self.source} keeps credentials in the credential store {self.store!r} (credsStore, "
            f"docker-credential-{self.store}), which is not supported; put them in 'auths', or pass "
            f"--pull-secret or ${ENV_USERNAME}/${ENV_PASSWORD}"
        )

    def credentials_for(self, registry: str) -> Credentials | None:
        keys = _DOCKER_HUB_KEYS if registry in _DOCKER_HUB_KEYS else (registry,)
        for key in keys:
            entry = self.auths.get(key)
            if entry is not None:
                return _entry_credentials(entry, f"{self.source} (auths[{key!r}])")
        helper = next((self.helpers[key] for key in keys if key in self.helpers), None)
        if helper is not None:
            raise CredentialsFileError(
                f"{self.source}: credentials for {registry} are in the credential helper {helper!r} "
                f"(credHelpers, docker-credential-{helper}), which is not supported; put them in 'auths'"
            )
        return None


def _host_key(key: str) -> str:
    """`https://host:5000/v1/` -> `host:5000`: Docker writes several spellings of the same host."""
    text = key.strip()
    for scheme in ("https://", "http://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    return text.split("/", 1)[0]


def _entry_credentials(entry: Mapping[str, Any], source: str) -> Credentials | None:
    if not isinstance(entry, Mapping):
        raise CredentialsFileError(f"{source}: expected an object with 'auth' or 'username'/'password'")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsFileError(f"{source}: 'auth' is not base64 of 'user:password'") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise CredentialsFileError(f"{source}: 'auth' decodes to no 'user:password' pair")
        return Credentials(user, password, source)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str):
        return Credentials(name, secret, source)
    return None


def _docker_config(data: Any, source: str, *, legacy: bool = False) -> DockerConfig:
    if not isinstance(data, Mapping):
        raise CredentialsFileError(f"{source}: expected a JSON object")
    auths = data if legacy else data.get("auths", {})
    if not isinstance(auths, Mapping):
        raise CredentialsFileError(f"{source}: 'auths' must be an object")
    helpers = data.get("credHelpers", {}) if not legacy else {}
    if not isinstance(helpers, Mapping):
        helpers = {}
    named = {_host_key(k): _helper_name(v) for k, v in helpers.items()}
    store = data.get("credsStore") if not legacy else None
    store_name = _helper_name(store) if isinstance(store, str) and store else None
    return DockerConfig({_host_key(k): v for k, v in auths.items()}, source, named, store_name)


def _helper_name(value: Any) -> str:
    """A helper name as it may appear in an error: printable, and short."""
    return "".join(c for c in str(value) if c.isprintable())[:_MAX_HELPER_NAME]


def pull_secret_from_manifest(manifest: Mapping[str, Any], source: str) -> DockerConfig:
    """A Kubernetes Secret (already parsed) of a docker-config type -> its Docker config."""
    if manifest.get("kind") != "Secret":
        raise CredentialsFileError(f"{source}: kind is {manifest.get('kind')!r}, expected 'Secret'")
    kind = manifest.get("type")
    keys = {"kubernetes.io/dockerconfigjson": ".dockerconfigjson", "kubernetes.io/dockercfg": ".dockercfg"}
    if kind not in keys:
        raise CredentialsFileError(f"{source}: type is {kind!r}, expected 'kubernetes.io/dockerconfigjson'")
    key = keys[str(kind)]
    string_data, data = manifest.get("stringData") or {}, manifest.get("data") or {}
    if not isinstance(string_data, Mapping) or not isinstance(data, Mapping):
        raise CredentialsFileError(f"{source}: 'data' and 'stringData' must be objects")
    if key in string_data:
        raw = str(string_data[key])
    elif key in data:
        try:
            raw = base64.b64decode(str(data[key]), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsFileError(f"{source}: data[{key!r}] is not base64 of UTF-8 JSON") from None
    else:
        raise CredentialsFileError(f"{source}: no {key!r} in 'data' or 'stringData'")
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise CredentialsFileError(f"{source}: {key!r} is not JSON") from None
    return _docker_config(parsed, f"{source} ({key})", legacy=key == ".dockercfg")


def load_pull_secret(path: str | Path) -> DockerConfig:
    """Read a Docker `config.json` or a Kubernetes Secret manifest (YAML or JSON) from a file."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise CredentialsFileError(f"pull secret {source}: cannot read ({exc.strerror})") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise CredentialsFileError(f"pull secret {source}: larger than {_MAX_FILE_BYTES} bytes")
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise CredentialsFileError(f"pull secret {source}: neither JSON nor YAML") from None
    if isinstance(data, Mapping) and data.get("kind") is not None:
        return pull_secret_from_manifest(data, f"pull secret {source}")
    return _docker_config(data, f"pull secret {source}")


def resolve_credentials(
    registry: str,
    pull_secret: DockerConfig | None = None,
    environ: Mapping[str, str] | None = None,
) -> Credentials | None:
    """The credentials to use for `registry`, or None for anonymous access (see module docstring)."""
    env = os.environ if environ is None else environ
    if pull_secret is not None:
        found = pull_secret.credentials_for(registry)
        if found is None:
            raise CredentialsFileError(f"{pull_secret.source}: no credentials for registry {registry!r}")
        return found
    user, password = env.get(ENV_USERNAME), env.get(ENV_PASSWORD)
    if user and password is not None:
        return Credentials(user, password, f"${ENV_USERNAME}/${ENV_PASSWORD}")
    for path in _config_candidates(env):
        if path.is_file():
            return load_pull_secret(path).credentials_for(registry)
    return None


def missing_credentials_hint(
    registry: str, pull_secret: DockerConfig | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """When a registry asked for credentials and `resolve_credentials` found none: the Docker config's
    credential store that may hold them (named, so the user knows where to look), or None."""
    env = os.environ if environ is None else environ
    if pull_secret is not None:
        return pull_secret.store_hint(registry)
    if env.get(ENV_USERNAME):
        return None
    for path in _config_candidates(env):
        if path.is_file():
            try:
                return load_pull_secret(path).store_hint(registry)
            except CredentialsFileError:
                return None
    return None


@contextlib.contextmanager
def naming_the_credential_store(
    registry: str,
    credentials: Credentials | None,
    pull_secret: DockerConfig | None,
    environ: Mapping[str, str] | None,
) -> Iterator[None]:
    """An AuthError of an anonymous request gains the credsStore that may hold the credentials."""
    try:
        yield
    except AuthError as exc:
        hint = missing_credentials_hint(registry, pull_secret, environ) if credentials is None else None
        if hint is None:
            raise
        named = AuthError(f"{exc}; {hint}")
        named.reason = exc.reason
        raise named from None


def _config_candidates(env: Mapping[str, str]) -> list[Path]:
    candidates = []
    if env.get("DOCKER_CONFIG"):
        candidates.append(Path(env["DOCKER_CONFIG"]) / "config.json")
    if env.get("HOME"):
        candidates.append(Path(env["HOME"]) / ".docker" / "config.json")
    return candidates
