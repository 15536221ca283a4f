"""Differential conformance: every fixture module x every scenario through real Envoy (V8) and the host.

The same echo upstream serves both; what the client gets and what the upstream saw must match.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.stack.envoy import Envoy
from sidecar.wasm.host import HttpCall, HttpCallResponse, Plugin
from sidecar.wasm.host.exchange import Request, Response, UpstreamRequest, run_exchange
from tests.support.wait import wait_for
from tests.support.wasm_host import RESET, EchoServer, bootstrap, echo_server, normalized, send

pytestmark = pytest.mark.envoy

CONFIG = "tag-1"
AUTHORITY = "example.com"
BIG = b"0123456789secret" * 12_000  # ~190 KB: Envoy and the host both see several body chunks


@dataclass(frozen=True)
class Scenario:
    name: str
    method: str = "GET"
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    # Envoy has already sent the headers upstream when it refuses an oversized held request body;
    # the upstream then sees a cut-off request, which the host reports (upstream_request.complete False).
    partial_upstream: bool = False


SCENARIOS = [
    Scenario("plain-get"),
    Scenario(
        "query-remove-replace",
        path="/a/b?x=1&y=2",
        headers=(("x-remove", "x-gone"), ("x-gone", "1"), ("x-replace", "orig"), ("x-keep", "k")),
    ),
    Scenario("delete", method="DELETE", path="/items/7"),
    Scenario("post-untouched", method="POST", path="/submit", body=b"my secret stays"),
    Scenario("body-rewrite", method="POST", path="/rw", headers=(("x-rewrite", "1"),), body=b"a secret, secret!"),
    Scenario("big-body-rewrite", method="PUT", path="/big", headers=(("x-rewrite", "1"),), body=BIG),
    Scenario("local-reply", path="/deny", headers=(("x-deny", "1"),)),
    Scenario("local-reply-with-body", method="POST", headers=(("x-deny", "1"),), body=b"never forwarded"),
    Scenario("callout-resume", path="/co", headers=(("x-callout", "1"),)),
    Scenario(
        "callout-pause-buffers-body",
        method="POST",
        path="/co",
        headers=(("x-callout", "1"),),
        body=b"held while paused",
    ),
    Scenario("callout-then-local-reply", path="/co", headers=(("x-callout", "deny"),)),
    Scenario("response-body-rewrite", path="/upper", headers=(("x-upper-response", "1"),)),
    Scenario(
        "big-response-rewrite",
        method="POST",
        path="/upper",
        headers=(("x-upper-response", "1"), ("x-rewrite", "1")),
        body=BIG,
    ),
    Scenario(
        "request-over-buffer-limit",
        method="POST",
        path="/huge",
        headers=(("x-rewrite", "1"),),
        body=b"s" * 1_100_000,
        partial_upstream=True,
    ),
    Scenario(
        "response-over-buffer-limit",
        method="POST",
        path="/huge",
        headers=(("x-upper-response", "1"),),
        body=b"s" * 1_100_000,
    ),
    Scenario("duplicate-request-headers", headers=(("x-dup", "one"), ("x-dup", "two"))),
    Scenario("response-pause-callout-resume", path="/rc", headers=(("x-response-callout", "1"),)),
    Scenario(
        "response-callout-with-body-rewrite",
        method="POST",
        path="/rc",
        headers=(("x-response-callout", "1"), ("x-upper-response", "1")),
        body=b"shout this",
    ),
    Scenario(
        "upstream-error-and-headers",
        path="/err",
        headers=(("x-echo-status", "503"), ("x-echo-h-x-from-upstream", "u1")),
    ),
]

MODULES = ["gcore_conformance", "solo_conformance", "gcore_readme", "solo_readme"]


@dataclass
class Setup:
    echo: EchoServer
    envoy: Envoy
    plugin: Plugin


def _forward(echo: EchoServer, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", echo.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            if k == ":authority":
                conn.putheader("host", v)
            elif not k.startswith(":") and k != "content-length":
                conn.putheader(k, v)
        if body or method in ("POST", "PUT"):
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return Response(resp.status, [(k.lower(), v) for k, v in resp.getheaders()], resp.read())
    finally:
        conn.close()


@pytest.fixture(scope="module", params=MODULES)
def setup(
    request: pytest.FixtureRequest, sdk_modules: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    module = sdk_modules[request.param]
    root_id = "fixture" if "conformance" in request.param else "add_header"
    with echo_server() as echo:

        def responder(call: HttpCall) -> HttpCallResponse:
            answer = _forward(
                echo, call.header(":method") or "GET", call.header(":path") or "/", call.headers, call.body
            )
            return HttpCallResponse([(":status", str(answer.status)), *answer.headers], answer.body)

        boot = bootstrap(module, root_id=root_id, configuration=CONFIG, upstream_port=echo.port)
        plugin = Plugin(
            module,
            name="fixture",
            root_id=root_id,
            vm_id="fixture-vm",
            configuration=CONFIG,
            http_responder=responder,
            cache=tmp_path_factory.mktemp("cwasm"),
        ).start()
        with Envoy(boot) as envoy:
            yield Setup(echo, envoy, plugin)


def _seen(echo: EchoServer) -> list[tuple[str, str, list[tuple[str, str]], bytes]]:
    out = [(s.method, s.path, normalized(s.headers), s.body) for s in echo.seen]
    echo.seen.clear()
    return sorted(out, key=lambda s: (s[1], s[0]))


def _client_view(resp: Response | None) -> tuple[int, list[tuple[str, str]], bytes]:
    assert resp is not None
    return resp.status, normalized(resp.headers), resp.body


def _wait_for_upstream(echo: EchoServer) -> None:
    wait_for(lambda: echo.seen, 5, "the request to reach the upstream")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_host_matches_envoy(setup: Setup, scenario: Scenario) -> None:
    headers = [("host", AUTHORITY), *scenario.headers]
    setup.echo.seen.clear()
    via_envoy = send(setup.envoy, scenario.method, scenario.path, headers, scenario.body)
    if scenario.partial_upstream:
        _wait_for_upstream(setup.echo)
    envoy_seen = _seen(setup.echo)

    def upstream(req: UpstreamRequest) -> Response:
        return _forward(setup.echo, req.header(":method") or "GET", req.header(":path") or "/", req.headers, req.body)

    request = Request(scenario.method, scenario.path, list(scenario.headers), scenario.body, authority=AUTHORITY)
    exchange = run_exchange(setup.plugin, request, upstream, chunk_size=16_384)
    host_seen = _seen(setup.echo)

    assert exchange.stalled is None, f"host stalled at {exchange.stalled}"
    assert _client_view(RESET if exchange.closed else exchange.response) == _client_view(via_envoy)
    if scenario.partial_upstream and via_envoy.status == 413:
        # The headers went upstream before the body outgrew the limit: the host reports that request as
        # cut short (it sends nothing); Envoy's upstream saw it and less than the whole body.
        cut = exchange.upstream_request
        assert cut is not None and not cut.complete and host_seen == []
        assert envoy_seen and len(envoy_seen[0][3]) < len(scenario.body)
        assert scenario.body.startswith(cut.body)
    else:
        assert host_seen == envoy_seen


def test_metrics_match_envoy(setup: Setup) -> None:
    name = "fixture_requests"
    before_host = setup.plugin.metrics.get(name, 0)
    before_envoy = setup.envoy.stats("wasmcustom").get(f"wasmcustom.{name}", 0)
    for i in range(3):
        send(setup.envoy, "GET", f"/m{i}", [("host", AUTHORITY)], b"")
        run_exchange(setup.plugin, Request(path=f"/m{i}", authority=AUTHORITY), Response(200, [], b"ok"))
    setup.echo.seen.clear()
    envoy_delta = setup.envoy.stats("wasmcustom").get(f"wasmcustom.{name}", 0) - before_envoy
    host_delta = setup.plugin.metrics.get(name, 0) - before_host
    assert host_delta == envoy_delta
    if "conformance" in str(setup.plugin.name) or name in setup.plugin.metrics:
        assert envoy_delta == 3
