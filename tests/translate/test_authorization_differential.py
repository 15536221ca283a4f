"""IP allow/deny lists on the direct peer: the project's render and EG's own xDS let the same requests through.

`test_client_ip_e2e.py` varies how the client address is detected; this module varies the peer itself and
the rule lists. Clients bind to many addresses of 127.0.0.0/8, so the peer Envoy sees is the one a rule
names. Two real Envoys: one runs EG's xDS for `authorization-client-cidr` (its listener, which trusts no
forwarded header, and its routes), one runs our render of the same intent written as EG resources.

EG's data names 10.x and 192.168.x networks; both sides get the same networks moved into 127.0.0.0/8 (first
octet 127), so a loopback client can be inside or outside each. Besides EG's three routes (/test: deny all,
/foo: a deny list on a route, /bar: an allow list from a Gateway-wide policy), seeded generated rule lists
mix Allow and Deny rules with nested and overlapping networks: EG's side is EG's own matcher entries from
the same case with the networks and actions changed (Envoy's matcher list takes the first match, which is
the rule EG documents), ours is a SecurityPolicy. Requests add spoofed forwarding headers and other
spellings of each path; status, the backend and path that served it and the headers it saw must agree.
"""

from __future__ import annotations

import copy
import ipaddress
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sidecar.stack.envoy import Envoy, validate_bootstrap
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from tests.support.translate_egxds import XDS, EgXds
from tests.support.translate_servers import NamedBackend

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not XDS.is_dir(), reason="EG reference data (../shared) not present"),
]

CASE = "authorization-client-cidr"
HOST = "www.example.com"
GENERATED = 10  # generated rule lists (routes /r0 .. /r9)
MAX_REQUESTS = 3000  # per Envoy: the loop is bounded

# Networks the generated rules draw from: nested (/8 > /16 > /24 > /32) and side by side.
NETWORKS = [
    "127.0.0.0/8",
    "127.1.0.0/16",
    "127.1.2.0/24",
    "127.1.2.3/32",
    "127.1.3.0/24",
    "127.2.0.0/15",
    "127.3.255.0/25",
    "127.0.1.0/24",
    "127.168.1.0/24",
    "127.75.2.0/24",
]
# Peers: inside each network, at its edges and outside all but the /8.
PEERS = [
    "127.0.0.1",
    "127.0.1.9",
    "127.0.2.1",
    "127.1.2.3",
    "127.1.2.4",
    "127.1.3.255",
    "127.1.4.1",
    "127.2.0.0",
    "127.3.255.127",
    "127.3.255.128",
    "127.168.1.1",
    "127.168.2.254",
    "127.75.1.1",
    "127.75.2.200",
    "127.9.9.9",
]
# What a client sends to look like an allowed or denied address; the listener trusts none of it.
SPOOFED: list[list[tuple[str, str]]] = [
    [],
    [("x-forwarded-for", "127.0.1.5")],
    [("x-forwarded-for", "10.0.1.5, 127.0.1.5")],
    [("x-forwarded-for", "127.168.1.1"), ("x-forwarded-for", "127.0.1.5")],
    [("x-real-ip", "127.0.1.5"), ("x-envoy-external-address", "127.0.1.5")],
    [("forwarded", "for=127.0.1.5"), ("x-envoy-internal", "true")],
]


def _to_loopback(cidr: str) -> str:
    """EG's 10.x / 192.168.x network with the first octet made 127 (the same change on both sides)."""
    net = ipaddress.ip_network(cidr)
    moved = ipaddress.ip_address((127 << 24) | (int(net.network_address) & 0x00FFFFFF))
    return f"{moved}/{net.prefixlen}"


@dataclass(frozen=True)
class Rule:
    action: str  # Allow or Deny
    cidrs: tuple[str, ...]


@dataclass(frozen=True)
class RuleList:
    path: str
    default: str
    rules: tuple[Rule, ...]


def generated_lists(seed: int = 12) -> list[RuleList]:
    chooser = random.Random(seed)
    lists = []
    for index in range(GENERATED):
        rules = tuple(
            Rule(chooser.choice(["Allow", "Deny"]), tuple(chooser.sample(NETWORKS, chooser.randint(1, 3))))
            for _ in range(chooser.randint(0 if index == 0 else 1, 5))
        )
        lists.append(RuleList(f"/r{index}", "Allow" if index % 2 else "Deny", rules))
    return lists


# ---- EG's side -------------------------------------------------------------------------------------------


def _cidr_ranges(cidrs: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    ranges = []
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr)
        ranges.append({"addressPrefix": str(net.network_address), "prefixLen": net.prefixlen})
    return ranges


def _ip_ranges(matcher: dict[str, Any]) -> list[dict[str, Any]]:
    ranges: list[dict[str, Any]] = matcher["predicate"]["singlePredicate"]["customMatch"]["typedConfig"]["cidrRanges"]
    return ranges


def eg_xds() -> EgXds:
    """EG's xDS for the case, its networks moved into 127/8, plus one route per generated rule list built
    from EG's own entries: an ALLOW and a DENY matcher entry and ALLOW / DENY defaults, as EG writes them."""
    xds = EgXds.load(CASE)
    (config,) = xds.routes
    (host,) = config["virtualHosts"]
    by_prefix = {route["match"]["pathSeparatedPrefix"]: route for route in host["routes"]}
    for route in host["routes"]:
        matcher = route["typedPerFilterConfig"]["envoy.filters.http.rbac"]["rbac"]["matcher"]
        for entry in (matcher.get("matcherList") or {}).get("matchers") or []:
            for cidr in _ip_ranges(entry):
                moved = _to_loopback(f"{cidr['addressPrefix']}/{cidr['prefixLen']}")
                cidr["addressPrefix"] = moved.split("/")[0]

    def rbac(route: dict[str, Any]) -> dict[str, Any]:
        return dict(route["typedPerFilterConfig"]["envoy.filters.http.rbac"]["rbac"]["matcher"])

    deny_entry = rbac(by_prefix["/foo"])["matcherList"]["matchers"][0]
    allow_entry = rbac(by_prefix["/bar"])["matcherList"]["matchers"][0]
    defaults = {"Allow": rbac(by_prefix["/foo"])["onNoMatch"], "Deny": rbac(by_prefix["/bar"])["onNoMatch"]}
    template = by_prefix["/foo"]
    for rule_list in generated_lists():
        route = copy.deepcopy(template)
        route["match"] = {"pathSeparatedPrefix": rule_list.path}
        route["name"] = f"generated{rule_list.path.replace('/', '-')}"
        generated: dict[str, Any] = {"onNoMatch": copy.deepcopy(defaults[rule_list.default])}
        entries = []
        for index, rule in enumerate(rule_list.rules):
            entry = copy.deepcopy(allow_entry if rule.action == "Allow" else deny_entry)
            entry["onMatch"]["action"]["name"] = f"rule-{index}"
            entry["predicate"]["singlePredicate"]["customMatch"]["typedConfig"]["cidrRanges"] = _cidr_ranges(rule.cidrs)
            entries.append(entry)
        if entries:
            generated["matcherList"] = {"matchers": entries}
        route["typedPerFilterConfig"]["envoy.filters.http.rbac"]["rbac"]["matcher"] = generated
        host["routes"].append(route)
    return xds


# ---- our side --------------------------------------------------------------------------------------------


def _policy(name: str, target: dict[str, str], default: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    authorization: dict[str, Any] = {"defaultAction": default}
    if rules:
        authorization["rules"] = rules
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "SecurityPolicy",
        "metadata": {"name": name},
        "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", **target}], "authorization": authorization},
    }


def _http_route(name: str, prefix: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name},
        "spec": {
            "parentRefs": [{"name": "eg"}],
            "hostnames": [HOST],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
                    "backendRefs": [{"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "app"}],
                }
            ],
        },
    }


def our_resources(backend: NamedBackend) -> list[dict[str, Any]]:
    """EG's case as EG resources (its test input names the same three routes and policies)."""
    gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "eg"},
        "spec": {"gatewayClassName": "eg", "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]},
    }
    app = {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "Backend",
        "metadata": {"name": "app"},
        "spec": {"endpoints": [{"ip": {"address": "127.0.0.1", "port": backend.port}}]},
    }

    def on_route(name: str) -> dict[str, str]:
        return {"kind": "HTTPRoute", "name": name}

    moved = {c: _to_loopback(c) for c in ("192.168.1.0/24", "192.168.2.0/24", "10.75.1.0/24", "10.75.2.0/24")}
    moved.update({c: _to_loopback(c) for c in ("10.0.1.0/24", "10.0.2.0/24")})
    resources = [gateway, app]
    resources += [_http_route("test", "/test"), _http_route("foo", "/foo"), _http_route("bar", "/bar")]
    resources.append(_policy("test", on_route("test"), "Deny", []))
    deny_lists = [["192.168.1.0/24", "192.168.2.0/24"], ["10.75.1.0/24", "10.75.2.0/24"]]
    rules = [{"action": "Deny", "principal": {"clientCIDRs": [moved[c] for c in cidrs]}} for cidrs in deny_lists]
    resources.append(_policy("foo", on_route("foo"), "Allow", rules))
    allow = [{"action": "Allow", "principal": {"clientCIDRs": [moved["10.0.1.0/24"], moved["10.0.2.0/24"]]}}]
    resources.append(_policy("policy-for-gateway", {"kind": "Gateway", "name": "eg"}, "Deny", allow))
    for index, rule_list in enumerate(generated_lists()):
        name = f"r{index}"
        resources.append(_http_route(name, rule_list.path))
        rules = [{"action": r.action, "principal": {"clientCIDRs": list(r.cidrs)}} for r in rule_list.rules]
        resources.append(_policy(name, on_route(name), rule_list.default, rules))
    return resources


# ---- traffic ---------------------------------------------------------------------------------------------


def _paths() -> Iterator[str]:
    """Each route's prefix as clients spell it, including spellings that normalize onto another route."""
    for prefix in ["/test", "/foo", "/bar", *(r.path for r in generated_lists())]:
        yield prefix
        yield prefix + "/x?q=1"
    yield from ["//foo", "/./bar", "/x/../bar", "/foo/../bar", "/bar/..%2F", "/%62ar", "/BAR", "/bar%2Fx", "/r1/../r2"]


def requests() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    for path in _paths():
        for headers in SPOOFED[:2] if path.startswith("/r") else SPOOFED:
            yield path, headers


@dataclass
class Pair:
    eg: Envoy
    ours: Envoy


@pytest.fixture(scope="module")
def envoys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    backend = NamedBackend("app")
    workdir = tmp_path_factory.mktemp("authorization")
    source = workdir / "resources.yaml"
    source.write_text(yaml.safe_dump_all(our_resources(backend)))
    ours = render_bootstrap([source], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
    eg = eg_xds().bootstrap("127.0.0.1", ("127.0.0.1", backend.port))
    started: list[Envoy] = []
    try:
        for bootstrap, name in ((eg, "eg"), (ours, "ours")):
            validate_bootstrap(bootstrap)
            started.append(Envoy(bootstrap, workdir=Path(workdir / name)).start())
        yield Pair(started[0], started[1])
    finally:
        for envoy in started:
            envoy.close()
        backend.close()


def _outcome(client: httpx.Client, base: str, path: str, headers: list[tuple[str, str]]) -> tuple[object, ...]:
    response = client.get(base + path, headers=[("host", HOST), *headers])
    served = response.text if response.headers.get("x-backend") else ""
    return response.status_code, served, response.headers.get("x-seen-headers", ""), response.headers.get("location")


def _base(envoy: Envoy, listener: str) -> str:
    host, port = envoy.listener_address(listener)
    return f"http://{host}:{port}"


def test_same_decisions_as_egs_xds_for_every_peer(envoys: Pair) -> None:
    eg_base = _base(envoys.eg, "envoy-gateway/gateway-1/http")
    our_base = _base(envoys.ours, "default/eg/http")
    shapes = list(requests())
    assert len(shapes) * len(PEERS) <= MAX_REQUESTS
    differences, allowed, denied = [], 0, 0
    for peer in PEERS:
        transport = httpx.HTTPTransport(local_address=peer)
        with httpx.Client(transport=transport, timeout=10) as client:
            for path, headers in shapes:
                want = _outcome(client, eg_base, path, headers)
                got = _outcome(client, our_base, path, headers)
                allowed += bool(want[1])
                denied += want[0] == 403
                if want != got:
                    differences.append(f"peer {peer} {path} {headers}:\n  EG   {want}\n  ours {got}")
    total = len(shapes) * len(PEERS)
    assert not differences, f"{len(differences)} of {total} differ:\n" + "\n".join(differences[:10])
    assert allowed and denied, f"allowed {allowed}, denied {denied}: the comparison must see both"


def test_the_peer_decides_not_what_the_client_claims(envoys: Pair) -> None:
    """Fixed expectations: /bar allows 127.0.1.0/24 only, whatever forwarding headers say."""
    base = _base(envoys.ours, "default/eg/http")
    outsider = httpx.HTTPTransport(local_address="127.9.9.9")
    insider = httpx.HTTPTransport(local_address="127.0.1.9")
    with httpx.Client(transport=outsider, timeout=10) as client:
        for headers in SPOOFED:
            assert _outcome(client, base, "/bar", headers)[0] == 403, headers
    with httpx.Client(transport=insider, timeout=10) as client:
        assert _outcome(client, base, "/bar", [])[0] == 200
        assert _outcome(client, base, "/foo/../bar", [])[0] in (200, 307)
