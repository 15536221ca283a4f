"""Consistent hashing: the project's render and EG's own xDS send each request to the same endpoint.

EG's `load-balancer` case gives Maglev clusters with a route hash on the source IP (fourth-route), on a
header (seventh-route, `name`) and on a cookie (ninth-route, `test`). In EG's data every route matches `/`
and every cluster has one endpoint, so hashing decides nothing; both sides get the same change: each of
the three routes matches its own prefix, and each cluster holds the same five loopback endpoints (EG's
locality, one lbEndpoint per backend, weight 1, as EG writes a Backend's endpoints). Our side is a Backend
with those five endpoints, one HTTPRoute per prefix and a BackendTrafficPolicy per route. Requests vary
the header and cookie values and the client's own address (15 addresses in 127.0.0.0/8); the endpoint
that answered must be the same.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

CASE = "load-balancer"
ENDPOINTS = 5
HASHES = {  # EG's route -> (our prefix, our consistentHash)
    "fourth-route": ("/source", {"type": "SourceIP"}),
    "seventh-route": ("/header", {"type": "Header", "header": {"name": "name"}}),
    "ninth-route": ("/cookie", {"type": "Cookie", "cookie": {"name": "test"}}),
}
PEERS = [f"127.{a}.{b}.{c}" for a, b, c in ((0, 0, 1), (0, 0, 2), (1, 2, 3), (9, 9, 9), (200, 1, 1))]
PEERS += [f"127.0.{n}.{n * 7 % 256}" for n in range(10, 20)]
# No empty or absent value: with nothing to hash, Envoy picks at random on either side.
VALUES = [f"user-{n}" for n in range(30)] + ["a" * 200, "%C3%BC", "x,y", "tab\tinside"]


def eg_bootstrap(backends: list[NamedBackend]) -> dict[str, Any]:
    xds = EgXds.load(CASE)
    (config,) = [rc for rc in xds.routes if rc["name"] == "first-listener"]
    host = config["virtualHosts"][0]
    host["routes"] = [r for r in host["routes"] if r["name"] in HASHES]
    for route in host["routes"]:
        route["match"] = {"pathSeparatedPrefix": HASHES[route["name"]][0]}
    assert len(host["routes"]) == len(HASHES)
    bootstrap = xds.bootstrap("127.0.0.1", ("127.0.0.1", 9))
    wanted = {r["route"]["cluster"] for r in host["routes"]}
    clusters = bootstrap["static_resources"]["clusters"]
    bootstrap["static_resources"]["clusters"] = [c for c in clusters if c["name"] in wanted]
    for cluster in bootstrap["static_resources"]["clusters"]:
        (locality,) = cluster["loadAssignment"]["endpoints"]
        (template,) = locality["lbEndpoints"]
        entries = []
        for named in backends:
            entry = copy.deepcopy(template)
            entry["endpoint"]["address"] = {"socketAddress": {"address": "127.0.0.1", "portValue": named.port}}
            entries.append(entry)
        locality["lbEndpoints"] = entries
    listeners = bootstrap["static_resources"]["listeners"]
    bootstrap["static_resources"]["listeners"] = [li for li in listeners if li["name"] == "first-listener"]
    return bootstrap


def our_resources(backends: list[NamedBackend]) -> str:
    text = GATEWAY + backend("pool", *(loopback(b.port) for b in backends))
    for name, (prefix, consistent) in HASHES.items():
        text += f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{name: eg}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
      backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: pool}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {{name: {name}}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: {name}}}]
  loadBalancer: {{type: ConsistentHash, consistentHash: {consistent}}}
"""
    return text


@pytest.fixture(scope="module")
def envoys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Envoy, Envoy]]:
    backends = [NamedBackend(f"e{i}") for i in range(ENDPOINTS)]
    workdir = tmp_path_factory.mktemp("lb")
    started: list[Envoy] = []
    try:
        source = workdir / "resources.yaml"
        source.write_text(our_resources(backends))
        ours = render_bootstrap([source], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
        for bootstrap, name in ((eg_bootstrap(backends), "eg"), (ours, "ours")):
            validate_bootstrap(bootstrap)
            started.append(Envoy(bootstrap, workdir=Path(workdir / name)).start())
        yield started[0], started[1]
    finally:
        for envoy in started:
            envoy.close()
        for backend in backends:
            backend.close()


def _requests() -> Iterator[tuple[str | None, str, list[tuple[str, str]]]]:
    for peer in PEERS:
        yield peer, "/source", []
    for value in VALUES:
        yield None, "/header", [("name", value)]
        yield None, "/cookie", [("cookie", f"test={value}")]
    yield None, "/header", [("name", "a"), ("name", "b")]
    yield None, "/cookie", [("cookie", "other=1; test=user-3")]


def test_same_endpoint_as_egs_xds(envoys: tuple[Envoy, Envoy]) -> None:
    eg, ours = envoys
    addresses = (eg.listener_address("first-listener"), ours.listener_address("default/eg/http"))
    bases = [f"http://{h}:{p}" for h, p in addresses]
    differences, seen = [], set()
    for peer, path, headers in _requests():
        transport = httpx.HTTPTransport(local_address=peer) if peer else None
        with httpx.Client(transport=transport, timeout=10) as client:
            want, got = (client.get(base + path, headers=headers).headers.get("x-backend") for base in bases)
        seen.add(want)
        if want != got:
            differences.append(f"{peer} {path} {headers}: EG {want}, ours {got}")
    assert not differences, "\n".join(differences[:10])
    assert len(seen - {None}) >= 3, f"hashing spread over {seen}: the comparison would prove little"
