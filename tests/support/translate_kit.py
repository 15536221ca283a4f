"""Shared pieces of the translator's tests: YAML inputs and builders, real-Envoy fixtures, HTTP helper."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from sidecar.stack.envoy import Envoy, validate_bootstrap
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from tests.support.translate_servers import NamedBackend

# A Gateway, an HTTPRoute and the Backend it routes to: the smallest input that renders.
BASE = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg}
spec:
  gatewayClassName: eg
  listeners: [{name: http, protocol: HTTP, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app}
spec:
  parentRefs: [{name: eg}]
  rules:
    - backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: app}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {name: app}
spec:
  endpoints: [{ip: {address: 127.0.0.1, port: 8080}}]
"""

GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg}
spec:
  gatewayClassName: eg
  listeners:
    - {name: http, protocol: HTTP, port: 80}
"""


def backend(name: str, *endpoints: str) -> str:
    listed = "".join(f"\n    - {endpoint}" for endpoint in endpoints)
    return f"""
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: {name}}}
spec:
  endpoints:{listed}
"""


# GATEWAY, an HTTPRoute to an FQDN Backend, and a Backend that is this sidecar (`envoy-sidecar/extproc`):
# what an EnvoyExtensionPolicy for the sidecar is added to.
SIDECAR_ROUTE = (
    GATEWAY
    + """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: myapp}
spec:
  parentRefs: [{name: eg}]
  rules:
    - backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: app}]
"""
    + backend("app", "{fqdn: {hostname: app.example.com, port: 80}}")
    + """---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata:
  name: envoy-sidecar
  annotations: {envoy-sidecar/extproc: "true"}
spec:
  endpoints: [{unix: {path: /placeholder.sock}}]
---
"""
)


def http_route(name: str, rules: str, host: str = "www.example.com") -> str:
    """An HTTPRoute on Gateway `eg` for `host`; `rules` is its rule list, each item indented four spaces."""
    return f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{name: eg}}]
  hostnames: ["{host}"]
  rules:
{rules}"""


def backend_ref(name: str) -> str:
    return f"{{group: gateway.envoyproxy.io, kind: Backend, name: {name}}}"


def route(name: str, prefix: str, *backends: str, host: str = "www.example.com") -> str:
    refs = "".join(f"\n        - {backend_ref(b)}" for b in backends)
    rule = f"    - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]\n      backendRefs:{refs}\n"
    return http_route(name, rule, host)


def loopback(port: int) -> str:
    """A Backend endpoint on 127.0.0.1 (for `backend()`)."""
    return f"{{ip: {{address: 127.0.0.1, port: {port}}}}}"


def gateway_route(host: str, prefix: str, port: int) -> str:
    """GATEWAY, HTTPRoute `httproute-1` (EG's xds-testdata name) for `host` and `prefix`, and its Backend
    `upstream` on 127.0.0.1:`port`: what the differential tests attach EG's policies to."""
    return GATEWAY + route("httproute-1", prefix, "upstream", host=host) + backend("upstream", loopback(port))


Run = Callable[..., str]


@pytest.fixture
def run_envoy(tmp_path: Path) -> Iterator[Run]:
    """Render YAML text, validate it with Envoy, run it; returns the listener's base URL."""
    started: list[Envoy] = []

    def run(text: str, **options: object) -> str:
        path = tmp_path / f"input-{len(started)}.yaml"
        path.write_text(text)
        bootstrap = render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True, **options))  # type: ignore[arg-type]
        validate_bootstrap(bootstrap)
        envoy = Envoy(bootstrap, workdir=tmp_path / f"envoy-{len(started)}")
        started.append(envoy)
        envoy.start()
        host, port = envoy.listener_address("default/eg/http")
        return f"http://{host}:{port}"

    yield run
    for envoy in started:
        envoy.close()


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[dict[str, NamedBackend]]:
    made = {
        "a": NamedBackend("a"),
        "b": NamedBackend("b"),
        "c": NamedBackend("c"),
        "uds": NamedBackend("uds", unix_path=tmp_path / "backend.sock"),
    }
    yield made
    for server in made.values():
        server.close()


def get(url: str, path: str, host: str = "www.example.com", **kwargs: object) -> httpx.Response:
    headers = {"host": host, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.get(url + path, headers=headers, timeout=10, **kwargs)  # type: ignore[arg-type]
