"""EnvoyExtensionPolicy extProc: the project's render and EG's own xDS, in two real Envoys, against real
ext_proc servers.

EG's `ext-proc` case holds two policies on one route (`/foo` on gateway.envoyproxy.io): policy-for-route-1
(request body BUFFERED_PARTIAL, response headers sent, fail open) and policy-for-route-2 (request headers
and a BUFFERED request body, a STREAMED response body, attributes, metadata namespaces forwarded and
received, mode override allowed, fail open). EG's side is its listener and route for `/foo` as written,
less the filters and routes of the case's other policies, with one change: the case's IR is hand-written
and processes a body without its headers, which EG's translator never produces from a policy (it sends
the headers of each direction the policy names), so those header modes are made SEND. Our side is the
same intent as one policy with two extProc entries (two policies on one route would conflict as
resources). Each side's processors are their own recording ext_proc servers (gRPC, loopback). The
metadata namespaces are compared as the processors see them (nothing upstream of the filters writes
metadata here, so that is the empty set on both; the configs themselves are compared in test_conformance).

Compared, per generated request: the status, body and headers the client gets, what the upstream saw,
and what each processor saw (the phases, which follow the processing mode; the attributes; the metadata
namespaces). Then with the processors down: EG fails open on this route, so must ours; and with both
sides' policies made fail closed (the same change on both), both must refuse. Bounded: 5 requests per
side per round, three rounds, 10s client timeout.
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
from tests.support.translate_kit import backend, gateway_route, loopback
from tests.support.translate_servers import ExtProcRecorder, NamedBackend
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not XDS.is_dir(), reason="EG reference data (../shared) not present"),
]

CASE = "ext-proc"
HOST = "gateway.envoyproxy.io"
POLICIES = ("policy-for-route-1", "policy-for-route-2")
EXT_PROC = "envoy.filters.http.ext_proc/envoyextensionpolicy/default/{}/extproc/0"
EG_CLUSTERS = {p: f"envoyextensionpolicy/default/{p}/0/grpc-backend-{n}" for p, n in zip(POLICIES, (2, 4), strict=True)}

REQUESTS: list[tuple[str, str, bytes]] = [
    ("GET", "/foo", b""),
    ("POST", "/foo/x", b"a small body"),
    ("POST", "/foo", b"b" * 70_000),  # past the 32 KiB buffer: BUFFERED refuses it, BUFFERED_PARTIAL does not
    ("GET", "/foo?q=1", b""),
    ("GET", "/foobar", b""),  # not under /foo: no route on either side
]


def eg_xds(fail_open: bool) -> EgXds:
    xds = EgXds.load(CASE)
    wanted = {EXT_PROC.format(p) for p in POLICIES}
    (hcm,) = list(xds.hcms())
    hcm["httpFilters"] = [f for f in hcm["httpFilters"] if f["name"] in wanted or f["name"].endswith(".router")]
    assert len(hcm["httpFilters"]) == 3
    for flt in hcm["httpFilters"]:
        if flt["name"] in wanted:
            assert flt["typedConfig"]["failureModeAllow"] is True
            flt["typedConfig"]["failureModeAllow"] = fail_open
            # The case's IR is written by hand: a body mode without its headers. EG's translator sends the
            # headers of any direction its processingMode names (envoyextensionpolicy.go), so EG's xDS for a
            # policy has them too; SKIP is made SEND (the default) where a body is processed.
            mode = flt["typedConfig"]["processingMode"]
            for direction in ("request", "response"):
                if f"{direction}BodyMode" in mode:
                    mode.pop(f"{direction}HeaderMode", None)
    config = next(rc for rc in xds.routes if rc["name"] == "envoy-gateway/gateway-1/http")
    host = config["virtualHosts"][0]
    assert host["domains"] == [HOST]
    host["routes"] = host["routes"][:1]
    assert set(host["routes"][0]["typedPerFilterConfig"]) == wanted
    config["virtualHosts"] = [host]
    return xds


def our_resources(upstream: int, ports: dict[str, int], fail_open: bool) -> str:
    policy_2 = """
    processingMode:
      request: {attributes: [xds.route_metadata, connection.requested_server_name], body: Buffered}
      response: {attributes: [request.path], body: Streamed}
      allowModeOverride: true
    metadata:
      accessibleNamespaces: [envoy.filters.http.ext_authz]
      writableNamespaces: [envoy.filters.http.my_custom]"""
    policy_1 = "\n    processingMode: {request: {body: BufferedPartial}, response: {}}"
    modes = {POLICIES[0]: policy_1, POLICIES[1]: policy_2}
    processors = "".join(backend(f"{name}-processor", loopback(port)) for name, port in ports.items())
    # EG's two policies on one route would conflict as resources (EG keeps the older): one policy with two
    # extProc entries, in EG's filter order, is the same traffic.
    entries = "".join(
        f"""
  - backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: {name}-processor}}]
    failOpen: {str(fail_open).lower()}
    messageTimeout: 5s{modes[name]}"""
        for name in ports
    )
    policy = f"""
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {{name: policy-for-route}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: httproute-1}}]
  extProc:{entries}
"""
    return gateway_route(HOST, "/foo", upstream) + processors + policy


class Side:
    """One Envoy with its own upstream and its own processors (recording ext_proc servers, one per policy)."""

    def __init__(self, name: str, workdir: Path, fail_open: bool) -> None:
        self.name = name
        self.backend = NamedBackend("upstream")
        self.processors = {policy: ExtProcRecorder("127.0.0.1:0") for policy in POLICIES}
        ports = {policy: rec.port for policy, rec in self.processors.items()}
        if name == "eg":
            per_cluster = {EG_CLUSTERS[p]: ("127.0.0.1", port) for p, port in ports.items()}
            bootstrap = eg_xds(fail_open).bootstrap("127.0.0.1", ("127.0.0.1", self.backend.port), per_cluster)
            self.listener = "envoy-gateway/gateway-1/http"
        else:
            source = workdir / "resources.yaml"
            source.write_text(our_resources(self.backend.port, ports, fail_open))
            bootstrap = render_bootstrap([source], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
            self.listener = "default/eg/http"
        validate_bootstrap(bootstrap)
        self.envoy = Envoy(bootstrap, workdir=workdir / name).start()

    def stop_processors(self) -> None:
        for recorder in self.processors.values():
            recorder.close()

    def seen(self) -> dict[str, Any]:
        """What each processor saw so far, then forgotten (phases; request_headers' attributes and metadata)."""
        found = {}
        for policy, rec in self.processors.items():
            found[policy] = (_chunks_as_one(rec.phases()), copy.deepcopy(rec.context))
            rec.seen.clear()
            rec.context.clear()
        return found

    def send(self, client: httpx.Client, method: str, path: str, body: bytes) -> tuple[Any, ...]:
        host, port = self.envoy.listener_address(self.listener)
        response = client.request(method, f"http://{host}:{port}{path}", headers={"host": HOST}, content=body)
        upstream = (response.headers.get("x-seen-headers", ""), response.headers.get("x-seen-body-bytes", ""))
        # A streamed body's last message can reach the processor after the client has its answer.
        wait_for(lambda: all(rec.idle() for rec in self.processors.values()), 5, "the ext_proc streams to close")
        return response.status_code, response.text, upstream, self.seen()

    def close(self) -> None:
        self.envoy.close()
        self.stop_processors()
        self.backend.close()


def _chunks_as_one(phases: list[str]) -> list[str]:
    """A streamed body reaches the processor in as many messages as the bytes arrive in (timing, on either
    side): consecutive body messages count as one phase."""
    return [p for i, p in enumerate(phases) if not (i and p == phases[i - 1] and p.endswith("_body"))]


_TRIES = 3


def _run(sides: tuple[Side, Side]) -> tuple[list[str], list[tuple[int, str]]]:
    """(differences, EG's (status, body bytes the upstream saw) per request)."""
    eg, ours = sides
    differences, statuses = [], []
    with httpx.Client(timeout=10) as client:
        for method, path, body in REQUESTS:
            # With a processor down, when Envoy learns that its gRPC stream failed races the request's body on
            # both sides (a BUFFERED body may be buffered past the limit first: 413, or not: 200). A pair that
            # differs is sent again; a difference in configuration differs every time, a race does not.
            for _ in range(_TRIES):
                want, got = eg.send(client, method, path, body), ours.send(client, method, path, body)
                if want == got:
                    break
            statuses.append((want[0], want[2][1]))
            if want != got:
                differences.append(f"{method} {path} ({len(body)} bytes):\n  EG   {want}\n  ours {got}")
    return differences, statuses


@pytest.fixture
def sides(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Side, Side]]:
    started: list[Side] = []
    try:
        for name in ("eg", "ours"):
            started.append(Side(name, tmp_path, request.param))
        yield started[0], started[1]
    finally:
        for side in started:
            side.close()


@pytest.mark.parametrize("sides", [True], indirect=True)
def test_processing_is_egs_and_a_processor_down_fails_open_as_in_eg(sides: tuple[Side, Side]) -> None:
    differences, statuses = _run(sides)
    assert not differences, "\n".join(differences)
    # A BUFFERED body past the 32 KiB connection buffer is refused (413) on both; the rest reach the upstream.
    assert statuses == [(200, "0"), (200, "12"), (413, ""), (200, "0"), (404, "")]
    phases = sides[0].seen()  # drained by _run: nothing left over
    assert all(not seen[0] for seen in phases.values())
    for side in sides:
        side.stop_processors()
    differences, statuses = _run(sides)
    assert not differences, "\n".join(differences)
    # The BUFFERED body past the buffer limit (third) may still be buffered before Envoy learns the stream
    # failed (413, on both sides alike); nothing is refused for the processor being down.
    codes = [s for s, _ in statuses]
    assert codes[:2] + codes[3:] == [200, 200, 200, 404] and codes[2] in (200, 413), "both fail open"


@pytest.mark.parametrize("sides", [False], indirect=True)
def test_a_processor_down_fails_closed_on_both(sides: tuple[Side, Side]) -> None:
    for side in sides:
        side.stop_processors()
    differences, statuses = _run(sides)
    assert not differences, "\n".join(differences)
    assert [s for s, _ in statuses] == [500, 500, 500, 500, 404], "no request reaches the upstream"
