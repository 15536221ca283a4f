"""Policy attachment as EG decides it: conflicts (the older wins), precedence, sections, targetRef rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import ConfigError
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from tests.support.translate_kit import Run, get
from tests.support.translate_servers import NamedBackend

GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg}
spec:
  gatewayClassName: eg
  listeners:
    - {name: http, protocol: HTTP, port: 80}
    - {name: other, protocol: HTTP, port: 81}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {name: app}
spec:
  endpoints: [{ip: {address: 127.0.0.1, port: PORT}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app}
spec:
  parentRefs: [{name: eg}]
  rules:
    - name: admin
      matches: [{path: {type: PathPrefix, value: /admin}}]
      backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: app}]
    - name: public
      matches: [{path: {type: PathPrefix, value: /}}]
      backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: app}]
"""


def security(name: str, target: str, action: str = "Deny", created: str | None = None) -> str:
    meta = f"{{name: {name}, creationTimestamp: '{created}'}}" if created else f"{{name: {name}}}"
    return f"""
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {meta}
spec:
  targetRefs: [{target}]
  authorization: {{defaultAction: {action}}}
"""


ROUTE = "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app}"
GW = "{group: gateway.networking.k8s.io, kind: Gateway, name: eg}"


def render(tmp_path: Path, text: str, port: int = 8080) -> dict[str, Any]:
    path = tmp_path / "input.yaml"
    path.write_text(text.replace("PORT", str(port)))
    return render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))


def refusal(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        render(tmp_path, text)
    return str(info.value)


def rbac_by_route(bootstrap: dict[str, Any]) -> dict[str, str]:
    """route name -> 'allow-all' / 'deny-all' / 'none', read from the rendered RBACPerRoute."""
    found = {}
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            hcm = chain["filters"][0]["typed_config"]
            for vhost in hcm["route_config"]["virtual_hosts"]:
                for route in vhost["routes"]:
                    rbac = (route.get("typed_per_filter_config") or {}).get("envoy.filters.http.rbac")
                    policies = ((rbac or {}).get("rbac") or {}).get("rules", {}).get("policies")
                    name = f"{listener['name']}|{route['name']}"
                    found[name] = "none" if rbac is None else ("allow-all" if policies else "deny-all")
    return found


def test_a_second_policy_on_the_same_target_is_conflicted_and_refused(tmp_path: Path) -> None:
    text = GATEWAY + security("first", ROUTE) + security("second", ROUTE, "Allow")
    message = refusal(tmp_path, text)
    assert "SecurityPolicy/default/second: spec.targetRefs[0]: conflicts with SecurityPolicy default/first" in message
    assert "Conflicted" in message


def test_the_older_policy_wins_by_creation_timestamp(tmp_path: Path) -> None:
    text = (
        GATEWAY
        + security("first", ROUTE, created="2024-05-01T00:00:00Z")
        + security("second", ROUTE, "Allow", created="2024-01-01T00:00:00Z")
    )
    assert "SecurityPolicy/default/first: spec.targetRefs[0]: conflicts with SecurityPolicy default/second" in (
        refusal(tmp_path, text)
    )


@pytest.mark.parametrize(
    "kind, body",
    [
        ("BackendTrafficPolicy", "loadBalancer: {type: Random}"),
        ("EnvoyExtensionPolicy", "wasm: []"),
        ("ClientTrafficPolicy", "clientIPDetection: {xForwardedFor: {numTrustedHops: 1}}"),
    ],
)
def test_every_claiming_kind_conflicts(tmp_path: Path, kind: str, body: str) -> None:
    policies = "".join(
        f"""
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: {kind}
metadata: {{name: p{i}}}
spec:
  targetRefs: [{GW.replace("}", ", sectionName: other}")}]
  {body}
"""
        for i in range(2)
    )
    assert f"{kind}/default/p1: spec.targetRefs[0]: conflicts with {kind} default/p0" in refusal(
        tmp_path, GATEWAY + policies
    )


def test_different_sections_of_one_target_do_not_conflict(tmp_path: Path) -> None:
    admin = ROUTE.replace("}", ", sectionName: admin}")
    public = ROUTE.replace("}", ", sectionName: public}")
    found = rbac_by_route(render(tmp_path, GATEWAY + security("a", admin) + security("b", public, "Allow")))
    assert found["default/eg/http|httproute/default/app/rule/0/match/0/wildcard"] == "deny-all"
    assert found["default/eg/http|httproute/default/app/rule/1/match/0/wildcard"] == "allow-all"


def test_a_policy_aimed_at_one_rule_applies_to_that_rule_only(tmp_path: Path) -> None:
    found = rbac_by_route(render(tmp_path, GATEWAY + security("a", ROUTE.replace("}", ", sectionName: admin}"))))
    assert found["default/eg/http|httproute/default/app/rule/0/match/0/wildcard"] == "deny-all"
    assert found["default/eg/http|httproute/default/app/rule/1/match/0/wildcard"] == "none"


def test_precedence_rule_over_route_over_listener_over_gateway(tmp_path: Path) -> None:
    text = (
        GATEWAY
        + security("gateway", GW, "Allow")
        + security("listener", GW.replace("}", ", sectionName: other}"))
        + security("route", ROUTE, "Allow")
        + security("rule", ROUTE.replace("}", ", sectionName: admin}"))
    )
    found = rbac_by_route(render(tmp_path, text))
    assert found["default/eg/http|httproute/default/app/rule/0/match/0/wildcard"] == "deny-all"  # rule
    assert found["default/eg/http|httproute/default/app/rule/1/match/0/wildcard"] == "allow-all"  # route
    # Without the route-level policies the listener-level one wins on its listener, the Gateway's elsewhere.
    found = rbac_by_route(
        render(
            tmp_path,
            GATEWAY + security("gateway", GW, "Allow") + security("listener", GW.replace("}", ", sectionName: other}")),
        )
    )
    assert found["default/eg/other|httproute/default/app/rule/1/match/0/wildcard"] == "deny-all"
    assert found["default/eg/http|httproute/default/app/rule/1/match/0/wildcard"] == "allow-all"


def test_eighteen_target_refs_are_accepted_as_in_eg(tmp_path: Path) -> None:
    routes = "".join(
        f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r{i}}}
spec:
  parentRefs: [{{name: eg, sectionName: other}}]
  hostnames: [r{i}.example.com]
  rules: [{{backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: app}}]}}]
"""
        for i in range(18)
    )
    targets = ", ".join(ROUTE.replace("name: app", f"name: r{i}") for i in range(18))
    found = rbac_by_route(render(tmp_path, GATEWAY + routes + security("many", targets)))
    assert sum(v == "deny-all" for v in found.values()) == 18


@pytest.mark.parametrize(
    "target, expected",
    [
        (
            "{group: gateway.envoyproxy.io, kind: HTTPRoute, name: app}",
            "spec.targetRefs[0].group: expected gateway.networking.k8s.io",
        ),
        (
            "{group: gateway.networking.k8s.io, kind: GRPCRoute, name: app}",
            "spec.targetRefs[0].kind: unsupported value 'GRPCRoute'",
        ),
        (
            "{group: gateway.networking.k8s.io, kind: Backend, name: app}",
            "spec.targetRefs[0]: expected group gateway.networking.k8s.io and kind",
        ),
        (
            "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app, sectionName: nope}",
            "spec.targetRefs[0].sectionName: HTTPRoute default/app has no section named 'nope'",
        ),
    ],
)
def test_target_refs_are_checked_as_eg_does(tmp_path: Path, target: str, expected: str) -> None:
    assert expected in refusal(tmp_path, GATEWAY + security("p", target))


@pytest.mark.envoy
def test_rule_section_in_real_envoy(run_envoy: Run, backends: dict[str, NamedBackend]) -> None:
    text = GATEWAY.replace("PORT", str(backends["a"].port)) + security("a", ROUTE.replace("}", ", sectionName: admin}"))
    url = run_envoy(text)
    assert get(url, "/admin/x", host="any.example.com").status_code == 403
    assert get(url, "/public", host="any.example.com").status_code == 200
    assert backends["a"].paths == ["/public"]


def test_a_single_target_ref_conflicts_with_an_older_policy_on_that_target(tmp_path: Path) -> None:
    """EG's securitypolicy-status-conditions shape: the older policy (with targetRefs) keeps the route, the
    newer one (with the singular targetRef, no other field) is Conflicted; the rule is the kind's, not CORS's."""
    newer = security("newer", ROUTE).replace(f"targetRefs: [{ROUTE}]", f"targetRef: {ROUTE}")
    text = GATEWAY + security("older", ROUTE) + newer.replace("  authorization: {defaultAction: Deny}\n", "")
    message = refusal(tmp_path, text)
    assert "SecurityPolicy/default/newer: spec.targetRef: conflicts with SecurityPolicy default/older" in message
