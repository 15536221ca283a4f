"""EnvoyExtensionPolicy Wasm: the project's render and EG's own xDS, in two real Envoys, running one module.

EG's `wasm` case puts policy-for-http-route's filter (`wasm-filter-4`, fail open, a JSON configuration) on
the `/foo` route of www.example.com. EG's side is that listener filter and route as written, less the
case's other policies and routes, with one change: EG's code source is a remote `httpUri` on EG's own
module cache (`wasm_cluster`, which the case does not hold), so it is pointed at the local module file
instead; a local file is what this project's render hands Envoy after fetching and verifying the module
(`code.local.filename`). Our side is the same intent as a policy with `code.type: HTTP`: the module is
served on loopback, fetched, checked against its sha256 and cached by the render. The module is
`tests/support/wat.py`'s `add_header(value)`: it adds `x-wasm` to every request it sees; then its `TRAP`,
which traps on every request, with the policy failing open (EG's setting) and closed (the same change on
both sides).

Compared, per generated request: status, body, and the headers the upstream saw (so: which requests the
module ran on, and what it did). Bounded: 5 requests per side per run, three runs, 10s client timeout.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import wasmtime

from sidecar.stack.envoy import Envoy, validate_bootstrap
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from sidecar.translate.wasmsource import fetch_module
from tests.support.translate_egxds import XDS, EgXds
from tests.support.translate_kit import gateway_route
from tests.support.translate_servers import NamedBackend
from tests.support.wat import TRAP, add_header

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not XDS.is_dir(), reason="EG reference data (../shared) not present"),
]

CASE = "wasm"
HOST = "www.example.com"
FILTER = "envoy.filters.http.wasm/envoyextensionpolicy/default/policy-for-http-route/wasm/0"

REQUESTS: list[tuple[str, list[tuple[str, str]]]] = [
    ("/foo", []),
    ("/foo/x?y=1", []),
    ("/foo", [("x-wasm", "from-the-client")]),  # the module adds: the upstream sees both
    ("/foobar", []),  # no route
    ("/", []),  # no route either (the case's other routes are left out)
]


def eg_xds(module: Path, fail_open: bool) -> EgXds:
    xds = EgXds.load(CASE)
    (hcm,) = list(xds.hcms())
    hcm["httpFilters"] = [f for f in hcm["httpFilters"] if f["name"] in (FILTER, "envoy.filters.http.router")]
    assert len(hcm["httpFilters"]) == 2
    vm = hcm["httpFilters"][0]["typedConfig"]["config"]["vmConfig"]
    assert "remote" in vm["code"]
    vm["code"] = {"local": {"filename": str(module)}}
    plugin = hcm["httpFilters"][0]["typedConfig"]["config"]
    assert plugin["failOpen"] is True
    plugin["failOpen"] = fail_open
    config = next(rc for rc in xds.routes if rc["name"] == "envoy-gateway/gateway-1/http")
    host = config["virtualHosts"][0]
    assert host["domains"] == [HOST]
    host["routes"] = host["routes"][:1]
    assert set(host["routes"][0]["typedPerFilterConfig"]) == {FILTER}
    config["virtualHosts"] = [host]
    # Only the route's cluster: others in the case use TLS from SDS secrets, which a lone Envoy has no source for.
    xds.clusters = [c for c in xds.clusters if c["name"] == host["routes"][0]["route"]["cluster"]]
    return xds


def our_resources(upstream: int, url: str, sha256: str, fail_open: bool) -> str:
    return (
        gateway_route(HOST, "/foo", upstream)
        + f"""
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {{name: policy-for-http-route}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: httproute-1}}]
  wasm:
  - name: wasm-filter-4
    failOpen: {str(fail_open).lower()}
    config: {{parameter1: {{key1: value1}}, parameter2: {{key2: {{key3: value3}}}}}}
    code:
      type: HTTP
      http: {{url: "{url}", sha256: {sha256}}}
"""
    )


@pytest.fixture
def module(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, str]]:
    """The module file (`request.param`'s text), and the URL a loopback server serves it at."""
    served = tmp_path / "served"
    served.mkdir()
    path = served / "filter.wasm"
    path.write_bytes(bytes(wasmtime.wat2wasm(request.param)))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path, f"http://127.0.0.1:{server.server_address[1]}/filter.wasm"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def envoys(tmp_path: Path, module: tuple[Path, str], fail_open: bool) -> Iterator[tuple[Envoy, Envoy]]:
    path, url = module
    upstream = NamedBackend("upstream")
    started: list[Envoy] = []
    try:
        eg = eg_xds(path, fail_open).bootstrap("127.0.0.1", ("127.0.0.1", upstream.port))
        source = tmp_path / "resources.yaml"
        source.write_text(our_resources(upstream.port, url, hashlib.sha256(path.read_bytes()).hexdigest(), fail_open))
        options = RenderOptions(
            listen_address="127.0.0.1",
            ephemeral_ports=True,
            fetch_module=lambda code, _secrets: fetch_module(code, tmp_path / "cache"),
        )
        ours = render_bootstrap([source], options)
        for bootstrap, name in ((eg, "eg"), (ours, "ours")):
            validate_bootstrap(bootstrap)
            started.append(Envoy(bootstrap, workdir=tmp_path / name).start())
        yield started[0], started[1]
    finally:
        for envoy in started:
            envoy.close()
        upstream.close()


def _outcome(
    client: httpx.Client, envoy: Envoy, listener: str, path: str, headers: list[tuple[str, str]]
) -> tuple[int, str, str]:
    host, port = envoy.listener_address(listener)
    response = client.get(f"http://{host}:{port}{path}", headers=[("host", HOST), *headers])
    return response.status_code, response.text, response.headers.get("x-seen-headers", "")


def _run(envoys: tuple[Envoy, Envoy]) -> tuple[list[str], list[tuple[int, bool]]]:
    """(differences, EG's (status, whether the module's header reached the upstream) per request)."""
    eg, ours = envoys
    differences, outcomes = [], []
    with httpx.Client(timeout=10) as client:
        for path, headers in REQUESTS:
            want = _outcome(client, eg, "envoy-gateway/gateway-1/http", path, headers)
            got = _outcome(client, ours, "default/eg/http", path, headers)
            outcomes.append((want[0], '"added-by-wasm"' in want[2]))
            if want != got:
                differences.append(f"{path} {headers}:\n  EG   {want}\n  ours {got}")
    return differences, outcomes


@pytest.mark.parametrize("fail_open", [True])
@pytest.mark.parametrize("module", [add_header("added-by-wasm")], indirect=True)
def test_the_module_runs_where_and_as_in_egs_xds(envoys: tuple[Envoy, Envoy]) -> None:
    differences, outcomes = _run(envoys)
    assert not differences, "\n".join(differences)
    assert outcomes == [(200, True), (200, True), (200, True), (404, False), (404, False)]


@pytest.mark.parametrize("fail_open", [True, False])
@pytest.mark.parametrize("module", [TRAP], indirect=True)
def test_a_trapping_module_fails_as_in_egs_xds(envoys: tuple[Envoy, Envoy], fail_open: bool) -> None:
    """The module traps on every request: EG's failOpen lets /foo through unfiltered, or refuses it."""
    differences, outcomes = _run(envoys)
    assert not differences, "\n".join(differences)
    statuses = [status for status, _ in outcomes]
    assert statuses[3:] == [404, 404]
    assert (statuses[:3] == [200] * 3) if fail_open else all(status >= 500 for status in statuses[:3])
