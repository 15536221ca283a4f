"""The seed examples (EG 1.1 highlights), completed into runnable sets, rendered and run in a real Envoy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from tests.support.translate_kit import GATEWAY, Run, backend, get, route
from tests.support.translate_servers import DnsServer, ExtProcRecorder, NamedBackend
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy


def test_backend_by_ip_fqdn_and_unix_socket(run_envoy: Run, backends: dict[str, NamedBackend]) -> None:
    dns = DnsServer({"echo.backend.test": "127.0.0.1"})
    try:
        text = (
            GATEWAY
            + backend("by-ip", f"ip: {{address: 127.0.0.1, port: {backends['a'].port}}}")
            + backend("by-fqdn", f"fqdn: {{hostname: echo.backend.test, port: {backends['b'].port}}}")
            + backend("by-uds", f"unix: {{path: {backends['uds'].unix_path}}}")
            + backend("by-fqdn-logical", f"fqdn: {{hostname: echo.backend.test, port: {backends['c'].port}}}").replace(
                "metadata: {name: by-fqdn-logical}",
                "metadata: {name: by-fqdn-logical, annotations: {envoy-sidecar/dns: logical}}",
            )
            + route("ip", "/ip", "by-ip")
            + route("fqdn", "/fqdn", "by-fqdn")
            + route("uds", "/uds", "by-uds")
            + route("logical", "/logical", "by-fqdn-logical")
            + route("mixed", "/mixed", "by-ip", "by-fqdn")  # EG 1.9: a cluster per backendRef, weighted
            + backend("by-both", f"ip: {{address: 127.0.0.1, port: {backends['a'].port}}}").replace(
                "    - ip:", f"    - fqdn: {{hostname: echo.backend.test, port: {backends['b'].port}}}\n    - ip:"
            )
            + route("both", "/both", "by-both")  # one Backend, both address types: one cluster resolving names
        )
        url = run_envoy(text, dns_resolver=("127.0.0.1", dns.port))
        assert get(url, "/ip/x").text == "a /ip/x"
        wait_for(lambda: get(url, "/fqdn").status_code == 200, what="the FQDN backend to resolve")
        assert get(url, "/fqdn").text == "b /fqdn"
        assert "echo.backend.test" in dns.queries
        wait_for(lambda: get(url, "/logical").status_code == 200, what="the LOGICAL_DNS backend to resolve")
        assert get(url, "/logical").text == "c /logical"
        # EG refuses unix sockets in route backendRefs (UnsupportedAddressType) and answers 500 instead.
        assert get(url, "/uds").status_code == 500 and backends["uds"].paths == []
        wait_for(lambda: {get(url, "/mixed").text[0] for _ in range(20)} == {"a", "b"}, what="both mixed backends")
        wait_for(lambda: {get(url, "/both").text[0] for _ in range(20)} == {"a", "b"}, what="both endpoint kinds")
        assert get(url, "/nothing").status_code == 404
        assert get(url, "/ip", host="other.example.com").status_code == 404
    finally:
        dns.close()


SECURITY = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: authorization-client-ip}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: http-with-authorization-client-ip}
  authorization:
    defaultAction: Deny
    rules:
    - action: Allow
      principal:
        clientCIDRs: [10.0.1.0/24, 10.0.2.0/24, "2001:db8::/32"]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {name: enable-client-ip-detection}
spec:
  clientIPDetection:
    xForwardedFor:
      numTrustedHops: 1
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: eg}
"""


def test_ip_allow_list_uses_the_client_ip_from_x_forwarded_for(
    run_envoy: Run, backends: dict[str, NamedBackend]
) -> None:
    text = (
        GATEWAY
        + backend("a", f"ip: {{address: 127.0.0.1, port: {backends['a'].port}}}")
        + route("http-with-authorization-client-ip", "/", "a")
        + SECURITY
    )
    url = run_envoy(text)
    assert get(url, "/", headers={"x-forwarded-for": "10.0.1.7"}).status_code == 200
    assert get(url, "/", headers={"x-forwarded-for": "10.0.2.200"}).status_code == 200
    assert get(url, "/", headers={"x-forwarded-for": "2001:db8::5"}).status_code == 200
    assert get(url, "/", headers={"x-forwarded-for": "192.0.2.1"}).status_code == 403
    assert get(url, "/", headers={"x-forwarded-for": "2001:db9::5"}).status_code == 403
    # One trusted hop: the address the trusted proxy appended counts, not what the client claimed before it.
    assert get(url, "/", headers={"x-forwarded-for": "10.0.1.7, 192.0.2.1"}).status_code == 403
    # Without the header the peer (127.0.0.1) is the client, and it is not allowed.
    assert get(url, "/").status_code == 403


def _lb_policy(spec: str) -> str:
    return f"""
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {{name: policy-for-route-1}}
spec:
  targetRef: {{group: gateway.networking.k8s.io, kind: HTTPRoute, name: httproute-1}}
  loadBalancer:
{spec}
"""


@pytest.mark.parametrize(
    ("spec", "request_kwargs"),
    [
        ("    type: ConsistentHash\n    consistentHash: {type: SourceIP}", {}),
        (
            "    type: ConsistentHash\n    consistentHash: {type: Header, header: {name: x-user}, tableSize: 65537}",
            {"headers": {"x-user": "ada"}},
        ),
        (
            "    type: ConsistentHash\n    consistentHash: {type: Cookie, cookie: {name: session, ttl: 60s}}",
            {"cookies": {"session": "abc123"}},
        ),
    ],
    ids=["source-ip", "header", "cookie"],
)
def test_consistent_hash_keeps_a_client_on_one_backend(
    run_envoy: Run, backends: dict[str, NamedBackend], spec: str, request_kwargs: dict[str, Any]
) -> None:
    text = GATEWAY + "".join(backend(n, f"ip: {{address: 127.0.0.1, port: {backends[n].port}}}") for n in "abc")
    url = run_envoy(text + route("httproute-1", "/", "a", "b", "c") + _lb_policy(spec))
    hits = {get(url, "/", **request_kwargs).headers["x-backend"] for _ in range(24)}
    assert len(hits) == 1


def test_round_robin_spreads(run_envoy: Run, backends: dict[str, NamedBackend]) -> None:
    text = GATEWAY + "".join(backend(n, f"ip: {{address: 127.0.0.1, port: {backends[n].port}}}") for n in "abc")
    url = run_envoy(text + route("httproute-1", "/", "a", "b", "c") + _lb_policy("    type: RoundRobin"))
    hits = {get(url, "/").headers["x-backend"] for _ in range(24)}
    assert hits == {"a", "b", "c"}


EXT_PROC = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: ext-proc-example}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: myapp}
  extProc:
  - backendRefs:
    - {group: gateway.envoyproxy.io, kind: Backend, name: grpc-ext-proc}
    processingMode:
      request: {}
      response:
        body: Streamed
"""


def test_ext_proc_sees_streamed_response_bodies(
    run_envoy: Run, backends: dict[str, NamedBackend], tmp_path: Path
) -> None:
    recorder = ExtProcRecorder(tmp_path / "extproc.sock")
    try:
        text = (
            GATEWAY
            + backend("a", f"ip: {{address: 127.0.0.1, port: {backends['a'].port}}}")
            + backend("grpc-ext-proc", f"unix: {{path: {recorder.path}}}")
            + route("myapp", "/", "a")
            + route("plain", "/plain", "a")
            + EXT_PROC
        )
        url = run_envoy(text)
        assert get(url, "/hello").text == "a /hello"
        assert recorder.phases()[:2] == ["request_headers", "response_headers"]
        bodies = [value for phase, value in recorder.seen if phase == "response_body"]
        assert b"".join(chunk for chunk, _ in bodies) == b"a /hello"
        assert bodies[-1][1] is True  # end_of_stream on the last chunk
        before = len(recorder.seen)
        # The filter is present once but enabled per route: the other route skips it.
        assert get(url, "/plain").text == "a /plain"
        assert len(recorder.seen) == before
    finally:
        recorder.close()


FILTER_ORDER = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyProxy
metadata: {name: custom-proxy-config}
spec:
  filterOrder:
    - {name: envoy.filters.http.rbac, before: envoy.filters.http.ext_proc}
    - {name: envoy.filters.http.cors, after: envoy.filters.http.basic_auth}
"""


@pytest.mark.parametrize("custom", [False, True], ids=["default-order", "rbac-first"])
def test_filter_order_in_config_and_behaviour(
    run_envoy: Run, backends: dict[str, NamedBackend], tmp_path: Path, custom: bool
) -> None:
    recorder = ExtProcRecorder(tmp_path / "extproc.sock")
    try:
        text = (
            GATEWAY
            + backend("a", f"ip: {{address: 127.0.0.1, port: {backends['a'].port}}}")
            + backend("grpc-ext-proc", f"unix: {{path: {recorder.path}}}")
            + route("myapp", "/", "a")
            + EXT_PROC
            + SECURITY.replace("http-with-authorization-client-ip", "myapp")
            + (FILTER_ORDER if custom else "")
        )
        path = tmp_path / "order.yaml"
        path.write_text(text)
        bootstrap = render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        names = [f["name"].partition("/")[0] for f in hcm["http_filters"]]
        expected = ["envoy.filters.http.ext_proc", "envoy.filters.http.rbac", "envoy.filters.http.router"]
        assert names == ([expected[1], expected[0], expected[2]] if custom else expected)
        url = run_envoy(text)
        assert get(url, "/", headers={"x-forwarded-for": "192.0.2.1"}).status_code == 403
        # Default order: ext_proc sees the request before RBAC denies it; RBAC first: it never does.
        assert ("request_headers" in recorder.phases()) is not custom
    finally:
        recorder.close()
