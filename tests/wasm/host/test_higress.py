"""A large real-world module: a Go-built Higress plugin (ABI 0_2_100, Go's wasip1 runtime)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sidecar.wasm.host import LogLevel, Plugin, WasmCallError
from sidecar.wasm.host.exchange import Request, Response, UpstreamRequest, run_exchange

CONFIG = {
    "routeNameHeader": "x-route-name",
    "clusterNameHeader": "x-cluster-name",
    "enableOnPathPrefix": ["/v1"],
}
PROPERTIES = {"route_name": "chat-route", "cluster_name": "outbound|8080||llm.default.svc.cluster.local"}


def test_loads_configures_and_handles_requests(higress_wasm: Path, shared_cache: Path) -> None:
    plugin = Plugin(higress_wasm, configuration=json.dumps(CONFIG), properties=PROPERTIES, cache=shared_cache)
    plugin.start()
    assert plugin.abi_version == "0_2_100"
    assert any("start successfully" in m for m in plugin.logs(LogLevel.INFO))

    matched = run_exchange(plugin, Request(path="/v1/chat/completions"), Response(200, [], b"{}"))
    assert matched.upstream_request is not None
    assert matched.upstream_request.header("x-route-name") == "chat-route"
    assert matched.upstream_request.header("x-cluster-name") == "llm.default.svc.cluster.local"
    assert matched.response is not None and matched.response.status == 200

    skipped = run_exchange(plugin, Request(path="/healthz"), Response(204))
    assert skipped.upstream_request is not None
    assert skipped.upstream_request.header("x-route-name") is None


def test_rejects_invalid_configuration(higress_wasm: Path, shared_cache: Path) -> None:
    plugin = Plugin(higress_wasm, configuration="{}", cache=shared_cache)
    with pytest.raises(
        WasmCallError, match=r"rejected its plugin configuration: .*routeNameHeader or clusterNameHeader"
    ):
        plugin.start()
    assert any("routeNameHeader or clusterNameHeader" in m for m in plugin.logs(LogLevel.WARN))


def test_compiled_cache_makes_reload_fast(higress_wasm: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    Plugin(higress_wasm, configuration=json.dumps(CONFIG), cache=tmp_path)
    cold = time.monotonic() - started
    assert list(tmp_path.glob("*.cwasm"))
    started = time.monotonic()
    Plugin(higress_wasm, configuration=json.dumps(CONFIG), cache=tmp_path).start()
    warm = time.monotonic() - started
    assert warm < cold / 3, (cold, warm)


def test_a_plugin_that_waits_in_its_headers_for_the_body_gets_it(
    higress_data_masking: Path, shared_cache: Path
) -> None:
    """Higress' gateway lets a headers StopIteration stand, so body data still reaches the plugin: unset,
    allow_on_headers_stop_iteration is on for 0_2_100 modules. (Upstream Envoy's default would stall it.)"""
    masking = [{"regex": "%{MOBILE}", "type": "replace"}]
    config = {"deny_openai": True, "deny_words": ["forbidden-word"], "replace_roles": masking}
    plugin = Plugin(higress_data_masking, configuration=json.dumps(config), cache=shared_cache).start()
    assert plugin.allow_on_headers_stop_iteration

    def chat(text: str) -> Request:
        body = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
        return Request("POST", "/v1/chat/completions", [("content-type", "application/json")], body)

    def echo(req: UpstreamRequest) -> Response:
        return Response(200, [("content-type", "application/json")], req.body)

    denied = run_exchange(plugin, chat("say the forbidden-word now"), echo)
    assert denied.stalled is None and denied.upstream_request is None
    assert denied.local_response is not None and denied.response is not None
    assert b"forbidden-word" not in denied.response.body

    masked = run_exchange(plugin, chat("call me at 13800138000 please"), echo)
    assert masked.stalled is None and masked.upstream_request is not None
    assert b"13800138000" not in masked.upstream_request.body and b"please" in masked.upstream_request.body

    stalled = Plugin(higress_data_masking, configuration=json.dumps(config), cache=shared_cache)
    stalled.allow_on_headers_stop_iteration = False  # upstream Envoy's default
    stalled.start()
    assert run_exchange(stalled, chat("hello"), echo).stalled == "request_headers"
