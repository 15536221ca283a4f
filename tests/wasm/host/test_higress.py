"""A large real-world module: a Go-built Higress plugin (ABI 0_2_100, Go's wasip1 runtime)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sidecar.wasm.host import LogLevel, Plugin, WasmCallError
from sidecar.wasm.host.exchange import Request, Response, run_exchange

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
