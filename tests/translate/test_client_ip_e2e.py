"""Client IP detection behind an IP allow list: the project's render and EG's own xDS give the same traffic.

Two real Envoys per address family. One runs EG's xDS: EG's listener and routes for client-CIDR
authorization (`authorization-client-cidr`: /foo denies 192.168.1.0/24, 192.168.2.0/24, 10.75.1.0/24 and
10.75.2.0/24; /bar allows only 10.0.1.0/24 and 10.0.2.0/24), once per client IP detection EG writes in
`client-ip-detection` (X-Forwarded-For with trusted hops, a custom header, a custom header failing closed,
trusted CIDRs). The other runs our render of the same intent written as EG resources: a Gateway with one
listener per detection, a ClientTrafficPolicy per listener (sectionName), SecurityPolicies on the routes.
Every request goes to the same listener of both, and status and the X-Forwarded-For the backend saw must
be the same. Requests cover too few entries, too many, spoofed entries left of the trusted proxy's,
garbage, repeated headers, IPv4 and IPv6 peers and entries.
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
from tests.support.translate_servers import NamedBackend

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not XDS.is_dir(), reason="EG reference data (../shared) not present"),
]

HEADER = "x-my-custom-header"  # the header EG's client-ip-detection test data names
LOOPBACK_CIDRS = ["127.0.0.0/8", "::1/128"]  # added to EG's trusted CIDRs so our loopback peer is a trusted proxy

# listener name -> clientIPDetection (EG resource form). Port numbers only name them apart.
DETECTIONS: dict[str, dict[str, Any]] = {
    "hops0": {"xForwardedFor": {"numTrustedHops": 0}},
    "hops1": {"xForwardedFor": {"numTrustedHops": 1}},
    "hops1-noappend": {"xForwardedFor": {"numTrustedHops": 1, "disableXForwardedForAppend": True}},
    "hops2-noappend": {"xForwardedFor": {"numTrustedHops": 2, "disableXForwardedForAppend": True}},
    "hops3": {"xForwardedFor": {"numTrustedHops": 3}},
    "header": {"customHeader": {"name": HEADER, "failClosed": False}},
    "header-closed": {"customHeader": {"name": HEADER, "failClosed": True}},
    "cidrs": {"xForwardedFor": {"trustedCIDRs": ["192.168.1.0/24", "10.0.0.0/16", "172.16.0.0/12", *LOOPBACK_CIDRS]}},
}


def _eg_extension(detection: dict[str, Any]) -> list[dict[str, Any]]:
    """EG's originalIpDetectionExtensions for `detection`, taken from EG's `client-ip-detection` xDS."""
    hcms = EgXds.load("client-ip-detection").hcms()
    extensions: list[list[dict[str, Any]]] = [hcm["originalIpDetectionExtensions"] for hcm in hcms]
    first, second, third, fourth = extensions
    if "customHeader" in detection:
        return copy.deepcopy(third if detection["customHeader"]["failClosed"] else second)
    xff = detection["xForwardedFor"]
    if "trustedCIDRs" in xff:
        extension = copy.deepcopy(fourth)
        cidrs = extension[0]["typedConfig"]["xffTrustedCidrs"]["cidrs"]
        cidrs += [{"addressPrefix": c.split("/")[0], "prefixLen": int(c.split("/")[1])} for c in LOOPBACK_CIDRS]
        return extension
    extension = copy.deepcopy(first)
    config = extension[0]["typedConfig"]
    # EG's data is numTrustedHops 2 -> xffNumTrustedHops 1 (listener.go writes max(N - 1, 0) for N hops):
    assert config["xffNumTrustedHops"] == 1
    config["xffNumTrustedHops"] = max(xff["numTrustedHops"] - 1, 0)
    config["skipXffAppend"] = bool(xff.get("disableXForwardedForAppend", False))
    return extension


def eg_bootstrap(address: str, backend: NamedBackend) -> dict[str, Any]:
    authz = EgXds.load("authorization-client-cidr")
    template = authz.listeners[0]
    listeners = []
    for name, detection in DETECTIONS.items():
        listener = copy.deepcopy(template)
        listener["name"] = listener["defaultFilterChain"]["name"] = f"eg/{name}"
        hcm = listener["defaultFilterChain"]["filters"][0]["typedConfig"]
        hcm["useRemoteAddress"] = False
        hcm["originalIpDetectionExtensions"] = _eg_extension(detection)
        listeners.append(listener)
    xds = EgXds(listeners, authz.routes, authz.clusters, authz.endpoints)
    return xds.bootstrap(address, ("127.0.0.1", backend.port))


def our_resources(backend: NamedBackend) -> str:
    listeners = "".join(
        f"\n    - {{name: {name}, protocol: HTTP, port: {8000 + i}}}" for i, name in enumerate(DETECTIONS)
    )
    policies = "".join(
        f"""
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {{name: detect-{name}}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: eg, sectionName: {name}}}]
  clientIPDetection: {detection}
"""
        for name, detection in DETECTIONS.items()
    )
    routes = "".join(
        f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{name: eg}}]
  hostnames: [www.example.com]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /{name}}}}}]
      backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: app}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {{name: {name}}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: {name}}}]
  authorization: {authorization}
"""
        for name, authorization in (
            ("test", {"defaultAction": "Deny"}),
            (
                "foo",
                {
                    "defaultAction": "Allow",
                    "rules": [
                        {"action": "Deny", "principal": {"clientCIDRs": ["192.168.1.0/24", "192.168.2.0/24"]}},
                        {"action": "Deny", "principal": {"clientCIDRs": ["10.75.1.0/24", "10.75.2.0/24"]}},
                    ],
                },
            ),
            (
                "bar",
                {
                    "defaultAction": "Deny",
                    "rules": [{"action": "Allow", "principal": {"clientCIDRs": ["10.0.1.0/24", "10.0.2.0/24"]}}],
                },
            ),
        )
    )
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg}}
spec:
  gatewayClassName: eg
  listeners:{listeners}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: app}}
spec:
  endpoints: [{{ip: {{address: 127.0.0.1, port: {backend.port}}}}}]
{policies}{routes}"""


Pair = tuple[Envoy, Envoy]


@pytest.fixture(scope="module")
def backend() -> Iterator[NamedBackend]:
    server = NamedBackend("app")
    yield server
    server.close()


def _start(bootstrap: dict[str, Any], workdir: Path) -> Envoy:
    validate_bootstrap(bootstrap)
    return Envoy(bootstrap, workdir=workdir).start()


@pytest.fixture(scope="module", params=["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def envoys(
    request: pytest.FixtureRequest, backend: NamedBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    address = str(request.param)
    workdir = tmp_path_factory.mktemp("client-ip")
    source = workdir / "resources.yaml"
    source.write_text(our_resources(backend))
    ours = render_bootstrap([source], RenderOptions(listen_address=address, ephemeral_ports=True))
    started: list[Envoy] = []
    try:
        started.append(_start(eg_bootstrap(address, backend), workdir / "eg"))
        started.append(_start(ours, workdir / "ours"))
        yield started[0], started[1]
    finally:
        for envoy in started:
            envoy.close()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as made:
        yield made


def outcome(
    client: httpx.Client, envoy: Envoy, listener: str, path: str, headers: list[tuple[str, str]]
) -> tuple[int, str]:
    host, port = envoy.listener_address(listener)
    url = f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"
    response = client.get(url, headers=[("host", "www.example.com"), *headers])
    return response.status_code, response.headers.get("x-seen-xff", "")


V4_CLIENT, V4_DENIED, V4_OTHER = "10.0.1.7", "192.168.1.5", "203.0.113.9"
V6_CLIENT = "2001:db8::7"
XFF_VALUES = [
    [],  # no header: the peer is the client
    [V4_CLIENT],  # one entry: fewer than some listeners trust
    [f"{V4_CLIENT}, {V4_OTHER}"],  # the client spoofs an allowed address left of what the proxy appended
    [f"{V4_OTHER}, {V4_CLIENT}"],
    [f"{V4_DENIED}, {V4_CLIENT}, {V4_OTHER}"],
    [f"{V4_CLIENT}, 10.0.2.9, 192.168.2.1, {V4_OTHER}"],  # more entries than any listener trusts
    [f"{V4_DENIED}"],
    ["10.75.1.1, 10.0.1.7"],
    ["not-an-address"],
    [f"{V4_CLIENT}, not-an-address"],
    [f"not-an-address, {V4_CLIENT}"],
    [""],
    [", ,"],
    [V4_CLIENT, V4_OTHER],  # two header lines
    [V6_CLIENT],
    [f"{V6_CLIENT}, {V4_CLIENT}"],
    [f"{V4_CLIENT}, {V6_CLIENT}"],
    ["[2001:db8::7]:443"],
    [f"{V4_CLIENT}:8080"],
    [", ".join([V4_OTHER] * 40 + [V4_CLIENT])],
]
HEADER_VALUES = [None, V4_CLIENT, V4_DENIED, V6_CLIENT, "garbage", "", f"{V4_CLIENT}, {V4_OTHER}"]


def _requests() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    for path in ("/foo", "/bar", "/test"):
        for xff in XFF_VALUES:
            yield path, [("x-forwarded-for", v) for v in xff]
        for value in HEADER_VALUES:
            custom = [(HEADER, value)] if value is not None else []
            yield path, [*custom, ("x-forwarded-for", V4_CLIENT)]


@pytest.mark.parametrize("listener", list(DETECTIONS))
def test_same_outcomes_as_egs_xds(envoys: Pair, client: httpx.Client, listener: str) -> None:
    eg, ours = envoys
    differences = []
    for path, headers in _requests():
        want = outcome(client, eg, f"eg/{listener}", path, headers)
        got = outcome(client, ours, f"default/eg/{listener}", path, headers)
        if want != got:
            differences.append(f"{path} {headers}: EG {want}, ours {got}")
    assert not differences, "\n".join(differences)


def test_the_allow_list_follows_the_trusted_hop_count(envoys: Pair, client: httpx.Client) -> None:
    """Fixed expectations (EG's documented rule: with N trusted hops, the Nth entry from the right)."""
    _, ours = envoys
    spoofed = [("x-forwarded-for", f"{V4_CLIENT}, {V4_OTHER}")]
    appended = [("x-forwarded-for", f"{V4_OTHER}, {V4_CLIENT}")]
    assert outcome(client, ours, "default/eg/hops1", "/bar", spoofed)[0] == 403
    assert outcome(client, ours, "default/eg/hops1", "/bar", appended)[0] == 200
    assert outcome(client, ours, "default/eg/hops2-noappend", "/bar", spoofed)[0] == 200
    assert outcome(client, ours, "default/eg/hops2-noappend", "/bar", appended)[0] == 403
    assert outcome(client, ours, "default/eg/hops1", "/bar", [])[0] == 403  # the loopback peer is not allowed
    assert outcome(client, ours, "default/eg/header-closed", "/bar", [])[0] == 403
    assert outcome(client, ours, "default/eg/header-closed", "/foo", [(HEADER, "garbage")])[0] == 403
    assert outcome(client, ours, "default/eg/header", "/foo", [(HEADER, "garbage")])[0] == 200
    assert outcome(client, ours, "default/eg/header", "/bar", [(HEADER, V4_CLIENT), *spoofed])[0] == 200
