"""HTTPRoute matches and filters, weights, mixed allow/deny authorization and a TCP extProc backend,
through a real Envoy."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sidecar.errors import ConfigError
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from tests.support.translate_kit import GATEWAY, Run, backend, backend_ref, get, http_route, loopback, route
from tests.support.translate_servers import ExtProcRecorder, NamedBackend

pytestmark = pytest.mark.envoy

ROUTES = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app}
spec:
  parentRefs: [{name: eg}]
  hostnames: [www.example.com]
  rules:
    - matches: [{path: {type: Exact, value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https, hostname: new.example.com, statusCode: 301,
                            path: {type: ReplaceFullPath, replaceFullPath: /new}}
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: URLRewrite
          urlRewrite: {hostname: internal.example.com, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-set, value: "1"}], remove: [x-drop]}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {add: [{name: x-added, value: "yes"}], remove: [x-backend]}
      backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: a}]
    - matches: [{path: {type: PathPrefix, value: /legacy}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /index.html}}
      backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: b}]
    - matches: [{path: {type: PathPrefix, value: /docs}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /manual}}
    - matches:
        - {path: {type: RegularExpression, value: "/items/[0-9]+"}, method: DELETE}
      backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: b}]
    - matches:
        - headers: [{name: x-canary, value: "true"}]
        - queryParams: [{type: RegularExpression, name: v, value: "2|3"}]
      backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: c}]
    - backendRefs:
        - {group: gateway.envoyproxy.io, kind: Backend, name: a, weight: 1}
        - {group: gateway.envoyproxy.io, kind: Backend, name: b, weight: 0}
"""


def test_matches_filters_and_weights(run_envoy: Run, backends: dict[str, NamedBackend]) -> None:
    text = GATEWAY + "".join(backend(n, f"ip: {{address: 127.0.0.1, port: {backends[n].port}}}") for n in "abc")
    url = run_envoy(text + ROUTES)
    redirect = get(url, "/old")
    assert redirect.status_code == 301 and redirect.headers["location"] == "https://new.example.com/new"
    rewritten = get(url, "/api/users", headers={"x-drop": "1"})
    assert rewritten.text == "a /v2/users"
    assert rewritten.headers["x-added"] == "yes" and "x-backend" not in rewritten.headers
    assert backends["a"].paths[-1] == "/v2/users"
    assert get(url, "/legacy/a/b?x=1").text == "b /index.html?x=1"
    moved = get(url, "/docs/intro")
    assert moved.status_code == 302 and moved.headers["location"] == "http://www.example.com/manual/intro"
    assert get(url, "/apix").text == "a /apix"  # not under the /api prefix: the weighted default rule
    assert get(url, "/items/42").text == "a /items/42"  # GET: falls through to the weighted default
    assert httpx.delete(url + "/items/42", headers={"host": "www.example.com"}, timeout=10).text == "b /items/42"
    assert get(url, "/x", headers={"x-canary": "true"}).text == "c /x"
    assert get(url, "/x", params={"v": "3"}).text == "c /x?v=3"
    assert {get(url, "/w").text for _ in range(10)} == {"a /w"}  # weight 0 never gets traffic


MIXED = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: mixed}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  authorization:
    defaultAction: Allow
    rules:
      - {name: block-one, action: Deny, principal: {clientCIDRs: [10.0.0.5/32]}}
      - {name: office, action: Allow, principal: {clientCIDRs: [10.0.0.0/24]}}
      - {name: block-lab, action: Deny, principal: {clientCIDRs: [10.0.0.0/16, "fd00::/8"]}}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {name: xff}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  clientIPDetection: {xForwardedFor: {numTrustedHops: 1}}
"""


@pytest.mark.parametrize(
    ("client", "status"),
    [
        ("10.0.0.5", 403),
        ("10.0.0.6", 200),
        ("10.0.7.1", 403),
        ("192.0.2.1", 200),
        ("fd00::1", 403),
        ("2001:db8::1", 200),
    ],
)
def test_first_matching_rule_decides_then_default(
    run_envoy: Run, backends: dict[str, NamedBackend], client: str, status: int
) -> None:
    text = GATEWAY + backend("a", f"ip: {{address: 127.0.0.1, port: {backends['a'].port}}}")
    url = run_envoy(text + route("app", "/", "a") + MIXED)
    assert get(url, "/", headers={"x-forwarded-for": client}).status_code == status


#: The rules' matches, each routed to its Backend; the last rule takes the rest.
RE2_MATCHES = [
    ('{path: {type: RegularExpression, value: "/users/[a-z0-9-]{1,64}/orders/[0-9]{1,12}"}}', "b"),
    ('{headers: [{type: RegularExpression, name: x-team, value: "\\\\p{Lu}\\\\p{Ll}+(?i)-OPS\\\\z"}]}', "c"),
    ('{path: {type: RegularExpression, value: "/(a)\\\\1"}}', "c"),
]
RE2_RULES = "".join(f"    - matches: [{match}]\n      backendRefs: [{backend_ref(to)}]\n" for match, to in RE2_MATCHES)
RE2_RULES += f"    - backendRefs: [{backend_ref('a')}]\n"


def test_regexes_route_as_re2_reads_them(run_envoy: Run, backends: dict[str, NamedBackend]) -> None:
    """RE2 syntax Python's `re` lacks (a Unicode class, a late flag, \\z), a regex whose RE2 program is over
    Envoy's default limit of 100, and a backreference RE2 refuses (its rule left out, as EG does): the config
    loads and each request goes where RE2's reading sends it."""
    text = GATEWAY + "".join(backend(n, loopback(backends[n].port)) for n in "abc")
    url = run_envoy(text + http_route("app", RE2_RULES))
    assert get(url, "/users/ana-1/orders/42").text == "b /users/ana-1/orders/42"
    assert get(url, "/users/ana-1/orders/x").text == "a /users/ana-1/orders/x"
    assert get(url, "/t", headers={"x-team": "Edith-ops"}).text == "c /t"  # (?i): "ops" matches "OPS"
    assert get(url, "/t", headers={"x-team": "edith-ops"}).text == "a /t"
    assert get(url, "/aa").text == "a /aa"  # the backreference's rule is not there


def test_ext_proc_backend_over_tcp(run_envoy: Run, backends: dict[str, NamedBackend]) -> None:
    recorder = ExtProcRecorder("127.0.0.1:0")
    port = recorder.port
    try:
        text = (
            GATEWAY
            + backend("a", f"ip: {{address: 127.0.0.1, port: {backends['a'].port}}}")
            + backend("proc", f"ip: {{address: 127.0.0.1, port: {port}}}")
            + route("app", "/", "a")
            + """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: tcp}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  extProc:
  - backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: proc}]
    processingMode: {request: {}}
"""
        )
        url = run_envoy(text)
        assert get(url, "/tcp").text == "a /tcp"
        assert recorder.phases() == ["request_headers"]
        assert recorder.seen[0][1][":path"] == "/tcp"
    finally:
        recorder.close()


CUSTOM_HEADER = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: allow-office}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  authorization:
    defaultAction: Deny
    rules: [{action: Allow, principal: {clientCIDRs: [10.0.1.0/24]}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {name: custom-header}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  clientIPDetection: {customHeader: {name: x-client-ip, failClosed: true}}
"""


def test_client_ip_from_a_custom_header(run_envoy: Run, backends: dict[str, NamedBackend]) -> None:
    text = GATEWAY + backend("a", f"ip: {{address: 127.0.0.1, port: {backends['a'].port}}}")
    url = run_envoy(text + route("app", "/", "a") + CUSTOM_HEADER)
    assert get(url, "/", headers={"x-client-ip": "10.0.1.9"}).status_code == 200
    assert get(url, "/", headers={"x-client-ip": "10.0.2.9"}).status_code == 403
    # X-Forwarded-For is not what counts here, and without the header failClosed answers 403.
    assert get(url, "/", headers={"x-forwarded-for": "10.0.1.9"}).status_code == 403


@pytest.mark.parametrize("h2c", [True, False], ids=["h2c", "http1"])
def test_h2c_backend_gets_http2(run_envoy: Run, h2c: bool) -> None:
    """A gRPC server only speaks HTTP/2, so it answers only when Envoy uses h2c."""
    grpc_server = ExtProcRecorder("127.0.0.1:0")
    try:
        protocols = "\n  appProtocols: [gateway.envoyproxy.io/h2c]" if h2c else ""
        text = (
            GATEWAY
            + backend("grpc", f"ip: {{address: 127.0.0.1, port: {grpc_server.port}}}").replace(
                "spec:\n", f"spec:{protocols}\n"
            )
            + route("app", "/", "grpc")
        )
        url = run_envoy(text)
        response = httpx.post(
            url + "/grpc.health.v1.Health/Check",
            content=b"\0\0\0\0\0",
            timeout=10,
            headers={"host": "www.example.com", "content-type": "application/grpc", "te": "trailers"},
        )
        # The server has no Health service: over HTTP/2 it says UNIMPLEMENTED (12). Over HTTP/1.1 it cannot
        # answer at all and Envoy's own gRPC reply says UNAVAILABLE (14).
        assert response.headers.get("grpc-status") == ("12" if h2c else "14")
    finally:
        grpc_server.close()


def test_a_fallback_backend_waits_behind_the_primary(run_envoy: Run, backends: dict[str, NamedBackend]) -> None:
    """EG's `fallback: true`: the Backend's locality gets priority 1 in the rule's one cluster. While the
    primary is healthy it gets no traffic; a rule whose only backend is a fallback still serves from it."""
    text = GATEWAY + backend("a", f"ip: {{address: 127.0.0.1, port: {backends['a'].port}}}")
    text += backend("b", f"ip: {{address: 127.0.0.1, port: {backends['b'].port}}}") + "  fallback: true\n"
    text += route("both", "/both", "a", "b") + route("alone", "/alone", "b")
    url = run_envoy(text)
    assert {get(url, "/both").text for _ in range(20)} == {"a /both"}
    assert get(url, "/alone").text == "b /alone"
    assert not [p for p in backends["b"].paths if p.startswith("/both")]


def test_a_fallback_that_would_need_a_cluster_of_its_own_is_refused(tmp_path: Path) -> None:
    """A fallback Backend beside a backend by name (another cluster): in a cluster of its own it would take
    its weighted share all the time, so the render stops naming the rule instead."""
    text = GATEWAY + backend("a", "fqdn: {hostname: primary.example.com, port: 80}")
    text += backend("b", "ip: {address: 127.0.0.1, port: 9}") + "  fallback: true\n"
    text += route("both", "/both", "a", "b")
    path = tmp_path / "input.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"HTTPRoute/default/both: spec\.rules\[0\]\.backendRefs: fallback Backend b"):
        render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
