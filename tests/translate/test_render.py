"""What the rendered bootstrap says, field by field (behaviour is covered by the real-Envoy tests)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.errors import ConfigError
from sidecar.translate.options import RenderOptions
from sidecar.translate.order import order_filters
from sidecar.translate.render import render_bootstrap
from sidecar.translate.wasmsource import fetch_module
from tests.support.translate_kit import BASE


def render(tmp_path: Path, extra: str, **options: Any) -> dict[str, Any]:
    path = tmp_path / "in.yaml"
    path.write_text(BASE + extra)
    return render_bootstrap([path], RenderOptions(**options))


def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    chain = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]
    typed: dict[str, Any] = chain["filters"][0]["typed_config"]
    return typed


def routes(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for vh in hcm(bootstrap)["route_config"]["virtual_hosts"] for r in vh["routes"]]


EXT_PROC = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: gw}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  extProc:
  - backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: proc}]
    messageTimeout: 750ms
    failOpen: false
    statusOnError: 503
    processingMode:
      allowModeOverride: true
      request: {body: FullDuplexStreamed, attributes: [request.path, connection.id]}
      response: {body: BufferedPartial}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {name: proc}
spec:
  endpoints: [{unix: {path: /run/proc.sock}}]
"""


def test_ext_proc_filter_fields_and_placement(tmp_path: Path) -> None:
    bootstrap = render(tmp_path, EXT_PROC)
    [ext_proc, router] = hcm(bootstrap)["http_filters"]
    assert ext_proc["name"] == "envoy.filters.http.ext_proc/envoyextensionpolicy/default/gw/extproc/0"
    assert ext_proc["disabled"] is True and router["name"] == "envoy.filters.http.router"
    config = ext_proc["typed_config"]
    assert config["message_timeout"] == "0.750s"
    assert config["allow_mode_override"] is True
    assert config["status_on_error"] == {"code": "ServiceUnavailable"}
    assert config["request_attributes"] == ["request.path", "connection.id"]
    assert config["processing_mode"] == {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "BUFFERED_PARTIAL",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SKIP",
    }
    assert config["grpc_service"]["envoy_grpc"] == {
        "cluster_name": "envoyextensionpolicy/default/gw/extproc/0",
        "authority": "proc.default",
    }
    [route] = routes(bootstrap)
    assert route["typed_per_filter_config"][ext_proc["name"]] == {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "config": {},
    }
    cluster = next(
        c
        for c in bootstrap["static_resources"]["clusters"]
        if c["name"] == config["grpc_service"]["envoy_grpc"]["cluster_name"]
    )
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "pipe": {"path": "/run/proc.sock"}
    }
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])


def test_route_policy_wins_over_gateway_policy(tmp_path: Path) -> None:
    extra = (
        EXT_PROC
        + """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: other}
spec:
  parentRefs: [{name: eg}]
  rules:
    - matches: [{path: {type: Exact, value: /other}}]
      backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: app}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: route}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: other}]
  extProc:
  - backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: proc}]
"""
    )
    by_name = {r["name"].split("/rule")[0]: r for r in routes(render(tmp_path, extra))}
    assert list(by_name["httproute/default/other"]["typed_per_filter_config"]) == [
        "envoy.filters.http.ext_proc/envoyextensionpolicy/default/route/extproc/0"
    ]
    assert list(by_name["httproute/default/app"]["typed_per_filter_config"]) == [
        "envoy.filters.http.ext_proc/envoyextensionpolicy/default/gw/extproc/0"
    ]


def test_route_precedence_exact_regex_longest_prefix(tmp_path: Path) -> None:
    extra = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: many}
spec:
  parentRefs: [{name: eg}]
  rules:
    - matches:
        - {path: {type: PathPrefix, value: /a}}
        - {path: {type: PathPrefix, value: /a/b/}}
        - {path: {type: RegularExpression, value: "/r/[0-9]+"}}
        - {path: {type: Exact, value: /a/exact}}
        - {path: {type: PathPrefix, value: /a}, headers: [{name: x-canary, value: "1"}]}
        - {path: {type: PathPrefix, value: /a}, method: POST}
      backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: app}]
"""
    matches = [r["match"] for r in routes(render(tmp_path, extra))]
    assert matches[:3] == [
        {"path": "/a/exact"},
        {"safe_regex": {"regex": "/r/[0-9]+"}},
        {"path_separated_prefix": "/a/b"},
    ]
    assert matches[3]["headers"][0]["name"] == ":method"
    assert matches[4]["headers"][0]["name"] == "x-canary"
    assert matches[5:] == [{"path_separated_prefix": "/a"}, {"prefix": "/"}]


def test_filter_order_seed_example_moves_all_instances() -> None:
    names = [
        "envoy.filters.http.router",
        "envoy.filters.http.wasm/p/0",
        "envoy.filters.http.cors",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.basic_auth",
        "envoy.filters.http.wasm/p/1",
        "envoy.filters.http.ext_proc/p/0",
    ]
    filters = [SimpleNamespace(name=n) for n in names]
    default = [f.name for f in order_filters(filters)]
    assert default == [
        "envoy.filters.http.cors",
        "envoy.filters.http.basic_auth",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.ext_proc/p/0",
        "envoy.filters.http.wasm/p/0",
        "envoy.filters.http.wasm/p/1",
        "envoy.filters.http.router",
    ]
    seed = [
        {"name": "envoy.filters.http.wasm", "before": "envoy.filters.http.jwt_authn"},
        {"name": "envoy.filters.http.cors", "after": "envoy.filters.http.basic_authn"},
    ]  # EG 1.1's name
    moved = [f.name for f in order_filters(filters, seed)]
    assert moved == [
        "envoy.filters.http.basic_auth",
        "envoy.filters.http.cors",
        "envoy.filters.http.wasm/p/0",
        "envoy.filters.http.wasm/p/1",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.ext_proc/p/0",
        "envoy.filters.http.router",
    ]
    absent = [{"name": "envoy.filters.http.wasm", "before": "envoy.filters.http.lua"}]
    assert [f.name for f in order_filters(filters, absent)] == default


def test_lb_policies_and_hash_policies(tmp_path: Path) -> None:
    def policy(spec: str) -> str:
        return (
            "\n---\napiVersion: gateway.envoyproxy.io/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {name: lb}\n"
            "spec: {targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: app}, "
            f"loadBalancer: {spec}}}\n"
        )

    def cluster_and_route(spec: str) -> tuple[dict[str, Any], dict[str, Any]]:
        bootstrap = render(tmp_path, policy(spec))
        return bootstrap["static_resources"]["clusters"][0], routes(bootstrap)[0]["route"]

    assert cluster_and_route("{type: LeastRequest}")[0]["lb_policy"] == "LEAST_REQUEST"
    assert render(tmp_path, "")["static_resources"]["clusters"][0]["lb_policy"] == "LEAST_REQUEST"  # EG's default
    assert cluster_and_route("{type: Random}")[0]["lb_policy"] == "RANDOM"
    assert "lb_policy" not in cluster_and_route("{type: RoundRobin}")[0]  # ROUND_ROBIN is the proto default
    cookie = "{name: sticky, ttl: 1h, attributes: {SameSite: Strict}}"
    cluster, route = cluster_and_route(
        f"{{type: ConsistentHash, consistentHash: {{type: Cookie, tableSize: 131, cookie: {cookie}}}}}"
    )
    assert cluster["lb_policy"] == "MAGLEV" and cluster["maglev_lb_config"] == {"table_size": 131}
    assert route["hash_policy"] == [
        {"cookie": {"name": "sticky", "ttl": "3600s", "attributes": [{"name": "SameSite", "value": "Strict"}]}}
    ]


def test_client_ip_custom_header(tmp_path: Path) -> None:
    extra = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {name: cip}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: eg}
  clientIPDetection: {customHeader: {name: x-client-ip, failClosed: true}}
"""
    manager = hcm(render(tmp_path, extra))
    [extension] = manager["original_ip_detection_extensions"]
    assert extension["typed_config"]["header_name"] == "x-client-ip"
    assert extension["typed_config"]["reject_with_status"] == {"code": "Forbidden"}
    assert extension["typed_config"]["allow_extension_to_set_address_as_trusted"] is True
    assert manager["use_remote_address"] is False  # the header, not the peer, is the client


def test_fetch_errors_name_the_policy_and_field(tmp_path: Path) -> None:
    extra = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata:
  name: oci-wasm-source-test
spec:
  targetRef:
    group: gateway.networking.k8s.io
    kind: HTTPRoute
    name: app
  wasm:
  - name: wasm-filter
    code:
      type: Image
      image:
        url: "oci://127.0.0.1:1/testwasm:v0.0.1"
        sha256: cdb37a856ae7dae208cdcb19378022cc81dbcae30859f58b89ae259a9575a49d
"""
    # Port 1 on loopback refuses at once: the real fetcher fails, and says where the reference came from.
    with pytest.raises(
        ConfigError,
        match=r"EnvoyExtensionPolicy/default/oci-wasm-source-test: spec.wasm\[0\].code: "
        r".*cannot reach registry 127\.0\.0\.1:1",
    ):
        render(tmp_path, extra, fetch_module=lambda code, secrets: fetch_module(code, tmp_path / "cache"))


def test_h2c_backend_speaks_http2_and_fqdn_uses_strict_dns(tmp_path: Path) -> None:
    extra = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: h2}
spec:
  parentRefs: [{name: eg}]
  hostnames: [grpc.example.com]
  rules:
    - backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: grpc}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {name: grpc}
spec:
  appProtocols: [gateway.envoyproxy.io/h2c]
  endpoints: [{fqdn: {hostname: grpc.example.com, port: 9000}}]
"""
    bootstrap = render(tmp_path, extra, dns_resolver=("127.0.0.1", 5353))
    cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "httproute/default/h2/rule/0")
    assert cluster["type"] == "STRICT_DNS"
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    resolver = cluster["typed_dns_resolver_config"]["typed_config"]["resolvers"]
    assert resolver == [{"socket_address": {"address": "127.0.0.1", "port_value": 5353}}]


def test_logical_dns_annotation(tmp_path: Path) -> None:
    extra = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{name: eg}]
  hostnames: [web.example.com]
  rules:
    - backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: httpbin}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata:
  name: httpbin
  annotations: {envoy-sidecar/dns: logical}
spec:
  endpoints: [{fqdn: {hostname: httpbin.org, port: 80}}]
"""
    clusters = render(tmp_path, extra)["static_resources"]["clusters"]
    assert next(c for c in clusters if c["name"] == "httproute/default/web/rule/0")["type"] == "LOGICAL_DNS"
    two = extra.replace("port: 80}}]", "port: 80}}, {fqdn: {hostname: eu.httpbin.org, port: 80}}]")
    with pytest.raises(
        ConfigError,
        match=r"HTTPRoute/default/web: spec.rules\[0\].backendRefs: Backend httpbin: "
        r"annotation envoy-sidecar/dns: logical needs",
    ):
        render(tmp_path, two)


def test_parent_refs_select_listeners_by_section_and_port(tmp_path: Path) -> None:
    base = BASE.replace(
        "listeners: [{name: http, protocol: HTTP, port: 80}]",
        "listeners: [{name: http, protocol: HTTP, port: 80}, {name: alt, protocol: HTTP, port: 8080}]",
    )
    extra = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: by-port}
spec:
  parentRefs: [{name: eg, port: 8080}]
  hostnames: [port.example.com]
  rules: [{backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: app}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: by-section}
spec:
  parentRefs: [{name: eg, sectionName: http}]
  hostnames: [section.example.com]
  rules: [{backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: app}]}]
"""
    path = tmp_path / "in.yaml"
    path.write_text(base + extra)
    listeners = render_bootstrap([path])["static_resources"]["listeners"]
    domains = {
        li["name"]: sorted(
            d
            for vh in li["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
            for d in vh["domains"]
        )
        for li in listeners
    }
    assert domains == {"default/eg/http": ["*", "section.example.com"], "default/eg/alt": ["*", "port.example.com"]}
    ports = {li["name"]: li["address"]["socket_address"]["port_value"] for li in listeners}
    assert ports == {"default/eg/http": 10080, "default/eg/alt": 8080}  # EG shifts privileged ports only
