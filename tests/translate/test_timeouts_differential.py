"""Route request timeouts: the project's render and EG's own xDS answer the same, in two real Envoys.

EG's `http-route-timeout` case: a route for requests with `user: jason` (request timeout 5s) before a
catch-all (4000s). Both sides get the 5s made 1s, the same change on both, so a backend that answers after
2s (`/slow`) crosses it. EG's routes also carry `idleTimeout` and `maxStreamDuration`, which come from a
BackendTrafficPolicy's `timeout.http` (not rendered here, refused by name); they are taken out of EG's side.
That matters: with `maxStreamDuration` on the route, Envoy ignores the route `timeout` (the 1s request in
EG's data as it stands is answered after 2s). Our side is the same intent as HTTPRoute rules with
`timeouts.request`. Status, body, the backend that answered and the headers it saw must be the same.
The run is bounded: 12 requests per side, at most 2s each.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sidecar.stack.envoy import Envoy, validate_bootstrap
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from tests.support.translate_egxds import XDS, EgXds
from tests.support.translate_kit import GATEWAY, backend, loopback
from tests.support.translate_servers import NamedBackend

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not XDS.is_dir(), reason="EG reference data (../shared) not present"),
]

CASE = "http-route-timeout"
SHORT = "1s"  # EG's 5s, on both sides

REQUESTS: list[tuple[str, list[tuple[str, str]]]] = [
    ("/fast", [("user", "jason")]),
    ("/slow", [("user", "jason")]),  # crosses the 1s timeout: 504
    ("/slow", []),  # the catch-all waits
    ("/slow", [("user", "Jason")]),  # header values match exactly
    ("/slow", [("user", "jason"), ("user", "bob")]),  # two lines: this Envoy still matches the route
    ("/slow/x?user=jason", []),
]


def eg_xds() -> EgXds:
    xds = EgXds.load(CASE)
    config = next(rc for rc in xds.routes if rc["name"] == "first-listener")
    first = config["virtualHosts"][0]["routes"][0]
    assert first["route"]["timeout"] == "5s" and first["match"]["headers"][0]["name"] == "user"
    first["route"]["timeout"] = SHORT
    config["virtualHosts"][0]["routes"][1:] = config["virtualHosts"][0]["routes"][1:2]  # then the catch-all
    for route in config["virtualHosts"][0]["routes"]:
        route["route"].pop("idleTimeout")
        route["route"].pop("maxStreamDuration")
    return xds


def our_resources(backends: dict[str, NamedBackend]) -> str:
    found = "".join(backend(name, loopback(named.port)) for name, named in backends.items())
    route = f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: timeouts}}
spec:
  parentRefs: [{{name: eg}}]
  rules:
    - matches: [{{headers: [{{name: user, value: jason}}]}}]
      timeouts: {{request: {SHORT}}}
      backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: first-route-dest}}]
    - timeouts: {{request: 4000s}}
      backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: second-route-dest}}]
"""
    return GATEWAY + route + found


@pytest.fixture(scope="module")
def envoys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Envoy, Envoy]]:
    backends = {name: NamedBackend(name) for name in ("first-route-dest", "second-route-dest")}
    workdir = tmp_path_factory.mktemp("timeouts")
    started: list[Envoy] = []
    try:
        per_cluster = {name: ("127.0.0.1", b.port) for name, b in backends.items()}
        eg = eg_xds().bootstrap("127.0.0.1", ("127.0.0.1", 9), per_cluster)
        source = workdir / "resources.yaml"
        source.write_text(our_resources(backends))
        ours = render_bootstrap([source], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
        for bootstrap, name in ((eg, "eg"), (ours, "ours")):
            validate_bootstrap(bootstrap)
            started.append(Envoy(bootstrap, workdir=Path(workdir / name)).start())
        yield started[0], started[1]
    finally:
        for envoy in started:
            envoy.close()
        for backend in backends.values():
            backend.close()


def _outcome(
    client: httpx.Client, envoy: Envoy, listener: str, path: str, headers: list[tuple[str, str]]
) -> tuple[int, str, str]:
    host, port = envoy.listener_address(listener)
    response = client.get(f"http://{host}:{port}{path}", headers=[("host", "www.example.com"), *headers])
    return response.status_code, response.text, response.headers.get("x-seen-headers", "")


def test_same_answers_as_egs_xds(envoys: tuple[Envoy, Envoy]) -> None:
    eg, ours = envoys
    differences, timed_out = [], 0
    with httpx.Client(timeout=10) as client:
        for path, headers in REQUESTS:
            want = _outcome(client, eg, "first-listener", path, headers)
            got = _outcome(client, ours, "default/eg/http", path, headers)
            timed_out += want[0] == 504
            if want != got:
                differences.append(f"{path} {headers}:\n  EG   {want}\n  ours {got}")
    assert not differences, "\n".join(differences)
    assert timed_out == 2, "exactly the slow requests on the short route time out"
