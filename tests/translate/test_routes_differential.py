"""Route features: the project's render and EG's own xDS give the same traffic, for generated requests.

For each family, one real Envoy runs EG's xDS from `../shared/reference/eg-v1.9.0/xds-testdata` (as a static
bootstrap, each of EG's clusters sent to a loopback backend named after it) and one runs our render of
the same intent written as EG resources. Every generated request (hosts, paths with edge cases, query
strings, headers, repeated headers, headers the backend answers with) goes to both; the status, the
backend and path that served it, the request headers it saw and the response headers must be the same.

EG's test data is written by hand at the IR level; where it holds what EG's own Gateway API layer never
produces (an empty header value, which EG refuses), that entry is taken out of EG's side, named below.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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

Request = tuple[str, str, list[tuple[str, str]]]  # host, path (with query), headers


@dataclass(frozen=True)
class Family:
    case: str  # the xds-testdata case
    listener: str  # EG's listener name in it
    clusters: tuple[str, ...]  # EG's cluster names; ours route to Backends of the same names
    routes: str  # our HTTPRoutes (and filters), with BACKEND(name) standing for a backendRef
    requests: Callable[[], Iterator[Request]]
    response_headers: tuple[str, ...] = ()  # compared besides status, body and the headers the backend saw
    drop_header: str | None = None  # taken out of EG's side (see the module doc)
    drop_authority_match: bool = False  # EG's hand-written IR matches :authority exactly; EG writes no such match
    # EG's data matches a header with an underscore, which EG's listener refuses (400) before any route: the
    # route could never be reached. Both sides match the dashed name instead, so the regex itself is tested.
    rename_header: tuple[str, str] | None = None


def _ref(name: str) -> str:
    return f"{{group: gateway.envoyproxy.io, kind: Backend, name: {name}}}"


def _route(name: str, rules: str, hostnames: list[str] | None = None) -> str:
    hosts = f"\n  hostnames: {json.dumps(hostnames)}" if hostnames else ""
    return f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{name: eg}}]{hosts}
  rules:{rules}
"""


# ---- the families ----------------------------------------------------------------------------------


def _matching_requests() -> Iterator[Request]:
    hosts = ["example.com", "example.net", "foo.com", "a.b.net", "other.org", "EXAMPLE.com", "example.com:10080"]
    paths = ["/", "/foo", "/foo/", "/foo/bar", "/foobar", "/v1/example", "/v1/example/x", "/v1/examplex"]
    paths += ["/v1/status", "/v1/status/1", "/V1/status", "/v1//status"]
    queries = ["", "?debug=yes", "?debug=no", "?debug=yes&debug=no", "?DEBUG=yes"]
    headers: list[list[tuple[str, str]]] = [[], [("version", "one")], [("version", "two")], [("Version", "one")]]
    for host, path, query, extra in itertools.product(hosts, paths, queries, headers):
        if query and extra:
            continue  # bounded: queries and headers each vary against every host and path
        yield host, path + query, extra


MATCHING = Family(
    case="http-route-multiple-matches",
    listener="first-listener",
    clusters=tuple(f"{n}-route-dest" for n in ("first", "second", "third", "fourth", "fifth", "sixth", "seventh")),
    routes="".join(
        [
            _route(
                "first",
                f"""
    - matches: [{{path: {{type: PathPrefix, value: /v1/example}}, queryParams: [{{name: debug, value: "yes"}}]}}]
      backendRefs: [{_ref("first-route-dest")}]""",
                ["example.com"],
            ),
            _route(
                "second",
                f"""
    - matches: [{{path: {{type: PathPrefix, value: /v1/example}}}}]
      backendRefs: [{_ref("second-route-dest")}]""",
                ["example.com"],
            ),
            _route(
                "third",
                f"""
    - matches: [{{path: {{type: PathPrefix, value: /v1/status}}, headers: [{{name: version, value: one}}]}}]
      backendRefs: [{_ref("third-route-dest")}]""",
                ["example.net"],
            ),
            _route(
                "fourth",
                f"""
    - matches: [{{path: {{type: PathPrefix, value: /v1/status}}}}]
      backendRefs: [{_ref("fourth-route-dest")}]""",
                ["example.net"],
            ),
            _route(
                "fifth",
                f"""
    - matches: [{{path: {{type: PathPrefix, value: /foo}}}}]
      backendRefs: [{_ref("fifth-route-dest")}]""",
                ["*.com"],
            ),
            _route(
                "sixth",
                f"""
    - matches: [{{path: {{type: PathPrefix, value: /foo}}}}]
      backendRefs: [{_ref("sixth-route-dest")}]""",
                ["*.net"],
            ),
            _route(
                "seventh",
                f"""
    - backendRefs: [{_ref("seventh-route-dest")}]""",
            ),
        ]
    ),
    requests=_matching_requests,
)


def _header_requests(direction: str) -> Callable[[], Iterator[Request]]:
    names = ["some-header", "Some-Header", "some-header-2", "some-header3", "some-header4", "some-header5"]
    names += ["SOME-HEADER6", "some-header-multi-value", "empty-header", "other"]
    values = ["client", "a,b", ""]

    def generate() -> Iterator[Request]:
        for name, value in itertools.product(names, values):
            sent = [(name, value)] if direction == "request" else [("x-reply-header", f"{name}:{value}")]
            yield "www.example.com", "/", sent
        for first, second in itertools.combinations(names[:8], 2):
            pair = [(first, "one"), (second, "two")]
            if direction == "response":
                pair = [("x-reply-header", f"{n}:{v}") for n, v in pair]
            yield "www.example.com", "/", pair
            yield "www.example.com", "/", pair + pair  # repeated lines

    return generate


def _modifier(kind: str) -> str:
    """The header changes of EG's test data (request: with a multi-value add, which the response one lacks)."""
    field = kind[0].lower() + kind[1:]
    multi = '\n              - {name: some-header-multi-value, value: "some-value,some-additional-value"}'
    return f"""
    - filters:
        - type: {kind}
          {field}:
            add:{multi if kind == "RequestHeaderModifier" else ""}
              - {{name: some-header, value: some-value}}
              - {{name: some-header-2, value: some-value}}
            set:
              - {{name: some-header3, value: some-value}}
              - {{name: some-header4, value: some-value}}
            remove: [some-header5, some-header6]
      backendRefs: [{_ref("DEST")}]"""


REQUEST_HEADERS = Family(
    case="http-route-request-headers",
    listener="first-listener",
    clusters=("request-header-route-dest",),
    routes=_route("headers", _modifier("RequestHeaderModifier").replace("DEST", "request-header-route-dest")),
    requests=_header_requests("request"),
    drop_header="empty-header",
)

RESPONSE_HEADERS = Family(
    case="http-route-response-add-remove-headers",
    listener="first-listener",
    clusters=("response-header-route-dest",),
    routes=_route("headers", _modifier("ResponseHeaderModifier").replace("DEST", "response-header-route-dest")),
    requests=_header_requests("response"),
    response_headers=(
        "some-header",
        "some-header-2",
        "some-header3",
        "some-header4",
        "some-header5",
        "some-header6",
        "some-header-multi-value",
        "other",
    ),
    drop_header="empty-header",
)


def _rewrite_requests() -> Iterator[Request]:
    paths = ["/origin", "/origin/", "/origin/a", "/origin/a/b?x=1", "/originx", "/origin%2Fa", "/Origin"]
    paths += ["//origin", "/origin/../x", "/origin/./a", "/origin?q=/origin", "/origin//a", "/x/origin"]
    for host, path in itertools.product(["gateway.envoyproxy.io", "other.io", "GATEWAY.envoyproxy.io"], paths):
        yield host, path, []


REWRITE = Family(
    case="http-route-rewrite-url-prefix",
    listener="first-listener",
    clusters=("rewrite-route-dest",),
    routes=_route(
        "rewrite",
        f"""
    - matches: [{{path: {{type: PathPrefix, value: /origin}}}}]
      filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /rewrite}}}}}}]
      backendRefs: [{_ref("rewrite-route-dest")}]""",
        ["gateway.envoyproxy.io"],
    ),
    requests=_rewrite_requests,
    drop_authority_match=True,
)


def _regex_requests() -> Iterator[Request]:
    paths = ["/v1/", "/v1/x", "/v1", "/v2/x", "/x/v1/y", "/v1/x?re_query=1", "/v1/x?re_query=", "/v1/x?other=1"]
    headers: list[list[tuple[str, str]]] = [[], [("re-header", "a")], [("re-header", "")], [("RE-HEADER", "b")]]
    headers += [[("re_header", "a")]]  # refused by both listeners
    for path, extra in itertools.product(paths, headers):
        yield "www.example.com", path, extra


REGEX = Family(
    case="http-route-regex",
    listener="first-listener",
    clusters=("regex-route-dest",),
    routes=_route(
        "regex",
        f"""
    - matches:
        - path: {{type: RegularExpression, value: "/v1/.*"}}
          headers: [{{type: RegularExpression, name: re-header, value: ".*"}}]
          queryParams: [{{type: RegularExpression, name: re_query, value: ".*"}}]
      backendRefs: [{_ref("regex-route-dest")}]""",
    ),
    requests=_regex_requests,
    rename_header=("re_header", "re-header"),
)

FAMILIES = {f.case: f for f in (MATCHING, REQUEST_HEADERS, RESPONSE_HEADERS, REWRITE, REGEX)}
MAX_REQUESTS = 800  # per family and Envoy: the generated shapes are bounded, and this bound is checked


# ---- running both ----------------------------------------------------------------------------------


def _without_header(xds: EgXds, name: str) -> None:
    for config in xds.routes:
        for vhost in config.get("virtualHosts") or []:
            for route in vhost.get("routes") or []:
                for field in ("requestHeadersToAdd", "responseHeadersToAdd"):
                    if field in route:
                        route[field] = [h for h in route[field] if h["header"]["key"] != name]


def _without_authority_match(xds: EgXds) -> None:
    for config in xds.routes:
        for vhost in config.get("virtualHosts") or []:
            for route in vhost.get("routes") or []:
                match = route["match"]
                match["headers"] = [h for h in match.get("headers") or [] if h["name"] != ":authority"]
                if not match["headers"]:
                    del match["headers"]


def _rename_header_match(xds: EgXds, old: str, new: str) -> None:
    for config in xds.routes:
        for vhost in config.get("virtualHosts") or []:
            for route in vhost.get("routes") or []:
                for header in route["match"].get("headers") or []:
                    if header["name"] == old:
                        header["name"] = new


def _ours(family: Family, backends: dict[str, NamedBackend]) -> str:
    found = "".join(
        f"""
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: {name}}}
spec:
  endpoints: [{{ip: {{address: 127.0.0.1, port: {backend.port}}}}}]
"""
        for name, backend in backends.items()
    )
    gateway = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg}
spec:
  gatewayClassName: eg
  listeners: [{name: http, protocol: HTTP, port: 80}]
"""
    return gateway + found + family.routes


@dataclass
class Pair:
    eg: Envoy
    ours: Envoy


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Family, Pair]]:
    family = FAMILIES[str(request.param)]
    backends = {name: NamedBackend(name) for name in family.clusters}
    workdir = tmp_path_factory.mktemp(family.case)
    started: list[Envoy] = []
    try:
        xds = EgXds.load(family.case)
        if family.drop_header:
            _without_header(xds, family.drop_header)
        if family.rename_header:
            _rename_header_match(xds, *family.rename_header)
        if family.drop_authority_match:
            _without_authority_match(xds)
        per_cluster = {name: ("127.0.0.1", b.port) for name, b in backends.items()}
        eg = xds.bootstrap("127.0.0.1", ("127.0.0.1", 9), per_cluster)  # port 9: nothing listens (discard)
        source = workdir / "resources.yaml"
        source.write_text(_ours(family, backends))
        ours = render_bootstrap([source], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
        for bootstrap, name in ((eg, "eg"), (ours, "ours")):
            validate_bootstrap(bootstrap)
            started.append(Envoy(bootstrap, workdir=workdir / name).start())
        yield family, Pair(started[0], started[1])
    finally:
        for envoy in started:
            envoy.close()
        for backend in backends.values():
            backend.close()


def _outcome(client: httpx.Client, base: str, family: Family, request: Request) -> tuple[object, ...]:
    host, path, headers = request
    response = client.get(base + path, headers=[("host", host), *headers])
    served = response.text if response.headers.get("x-backend") else ""
    seen = response.headers.get("x-seen-headers", "")
    answered = [(n, response.headers.get_list(n)) for n in family.response_headers]
    return response.status_code, served, seen, answered, response.headers.get("location")


def _base(envoy: Envoy, listener: str) -> str:
    host, port = envoy.listener_address(listener)
    return f"http://{host}:{port}"


def test_same_traffic_as_egs_xds(pair: tuple[Family, Pair]) -> None:
    family, envoys = pair
    requests = list(family.requests())
    assert 0 < len(requests) <= MAX_REQUESTS
    eg_base, our_base = _base(envoys.eg, family.listener), _base(envoys.ours, "default/eg/http")
    differences = []
    served = 0
    with httpx.Client(timeout=10) as client:
        for request in requests:
            want = _outcome(client, eg_base, family, request)
            got = _outcome(client, our_base, family, request)
            served += bool(want[1])
            if want != got:
                differences.append(f"{request}:\n  EG   {want}\n  ours {got}")
    assert not differences, f"{len(differences)} of {len(requests)} differ:\n" + "\n".join(differences[:10])
    assert served, "no request reached a backend: the comparison would prove nothing"


def test_a_path_spelled_another_way_cannot_bypass_a_route_policy(tmp_path_factory: pytest.TempPathFactory) -> None:
    """EG's listener normalizes paths before routing, so a SecurityPolicy on /admin holds for every spelling."""
    admin, public = NamedBackend("admin"), NamedBackend("public")
    workdir = tmp_path_factory.mktemp("bypass")
    source = workdir / "resources.yaml"
    backends = {"admin": admin, "public": public}
    routes = _route(
        "admin",
        f"\n    - matches: [{{path: {{type: PathPrefix, value: /admin}}}}]\n      backendRefs: [{_ref('admin')}]",
    ) + _route("public", f"\n    - backendRefs: [{_ref('public')}]")
    deny = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: admin-closed}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: admin}]
  authorization: {defaultAction: Deny}
"""
    source.write_text(_ours(Family("", "", (), routes, lambda: iter(())), backends) + deny)
    bootstrap = render_bootstrap([source], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
    spellings = ["/admin", "//admin", "/./admin", "/x/../admin", "/admin/", "/%2Fadmin", "/admin%2Fx", "///admin//x"]
    try:
        with Envoy(bootstrap, workdir=workdir / "envoy") as envoy, httpx.Client(timeout=10) as client:
            base = _base(envoy, "default/eg/http")
            outcomes = {path: client.get(base + path) for path in spellings}
            assert client.get(base + "/public").headers.get("x-backend") == "public"  # the catch-all does serve
    finally:
        admin.close()
        public.close()
    leaked = {p: r.status_code for p, r in outcomes.items() if r.headers.get("x-backend")}
    assert not leaked, f"reached a backend past the policy: {leaked}"
    assert all(r.status_code in (403, 307) for r in outcomes.values()), {p: r.status_code for p, r in outcomes.items()}
