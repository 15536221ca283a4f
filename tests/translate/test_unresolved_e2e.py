"""backendRefs EG cannot resolve answer 500 for their share, in a real Envoy; never plain text, never elsewhere."""

from __future__ import annotations

import pytest

from tests.support.translate_kit import GATEWAY, Run, backend, get
from tests.support.translate_servers import NamedBackend

pytestmark = pytest.mark.envoy


def _route(name: str, prefix: str, refs: str) -> str:
    return f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{name: eg}}]
  hostnames: ["www.example.com"]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
      backendRefs:{refs}
"""


def _ref(name: str, weight: int = 1, kind: str = "Backend") -> str:
    group = "gateway.envoyproxy.io" if kind == "Backend" else '""'
    port = ", port: 8080" if kind == "Service" else ""
    return f"\n        - {{group: {group}, kind: {kind}, name: {name}, weight: {weight}{port}}}"


BROKEN_TLS = """
---
apiVersion: v1
kind: ConfigMap
metadata: {name: not-a-ca}
data: {"one.pem": "x", "two.pem": "y"}
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: tls-for-b}
spec:
  targetRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: b}]
  validation:
    hostname: b.example.com
    caCertificateRefs: [{group: "", kind: ConfigMap, name: not-a-ca}]
"""


def test_unresolved_shares_answer_500_and_reach_nobody(run_envoy: Run, backends: dict[str, NamedBackend]) -> None:
    text = (
        GATEWAY
        + backend("a", f"ip: {{address: 127.0.0.1, port: {backends['a'].port}}}")
        + backend("b", f"ip: {{address: 127.0.0.1, port: {backends['b'].port}}}")
        + backend("uds", f"unix: {{path: {backends['uds'].unix_path}}}")
        + BROKEN_TLS
        + _route("half-missing", "/half", _ref("a") + _ref("nowhere"))
        + _route("mostly-broken-tls", "/tls", _ref("a", 1) + _ref("b", 3))
        + _route("only-broken-tls", "/only-tls", _ref("b"))
        + _route("socket", "/uds", _ref("uds"))
        + _route("service-without-port", "/svc", _ref("svc", kind="Service").replace(", port: 8080", ""))
        + _route("zero-weight-missing", "/zero", _ref("a") + _ref("nowhere", 0))
    )
    url = run_envoy(text)
    half = [get(url, "/half").status_code for _ in range(40)]
    assert set(half) == {200, 500}  # both shares in 40 tries (each has p = 2^-40 of never showing)
    tls = [get(url, "/tls").status_code for _ in range(40)]
    assert set(tls) == {200, 500} and tls.count(500) > tls.count(200)  # weights 3:1 for the 500 share
    assert {get(url, "/only-tls").status_code for _ in range(10)} == {500}
    assert {get(url, "/uds").status_code for _ in range(5)} == {500}
    assert get(url, "/svc").status_code == 500
    assert {get(url, "/zero").status_code for _ in range(10)} == {200}
    # The backend behind the unusable BackendTLSPolicy, and the socket, never saw a request, in any form.
    assert backends["b"].paths == []
    assert backends["uds"].paths == []
    assert all(p.startswith(("/half", "/tls", "/zero")) for p in backends["a"].paths)


def test_a_rule_whose_filters_eg_cannot_apply_answers_500_the_others_route(
    run_envoy: Run, backends: dict[str, NamedBackend]
) -> None:
    """EG's filter errors (here a header modifier setting Host) make that rule answer 500; the route stays."""
    bad = _route("app", "/bad", _ref("a")).replace(
        "      backendRefs:",
        "      filters: [{type: RequestHeaderModifier, requestHeaderModifier: "
        "{set: [{name: Host, value: evil.example}]}}]\n      backendRefs:",
    )
    good = "    - matches: [{path: {type: PathPrefix, value: /good}}]\n      backendRefs:" + _ref("a") + "\n"
    text = GATEWAY + backend("a", f"ip: {{address: 127.0.0.1, port: {backends['a'].port}}}") + bad + good
    url = run_envoy(text)
    assert get(url, "/bad").status_code == 500
    assert get(url, "/good").status_code == 200
    assert backends["a"].paths == ["/good"]
