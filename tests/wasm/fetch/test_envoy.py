"""End to end with a real Envoy (V8): a proxy-wasm module pulled from the registry is handed to
Envoy by `envoy_code`, as a local file and over HTTP with `remote.sha256`, and Envoy runs it."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from sidecar.stack.envoy import Envoy
from sidecar.wasm.fetch.auth import load_pull_secret
from sidecar.wasm.fetch.cache import ModuleCache
from sidecar.wasm.fetch.fetcher import ModuleFetcher
from sidecar.wasm.fetch.handoff import ModuleServer
from sidecar.wasm.fetch.source import HttpHandoff, LocalHandoff, envoy_code
from sidecar.wasm.fetch.transfer import FetchOptions
from tests.support.wasm_fetch import Registry, run

BODY = b"answered by a fetched module"
_TYPES = "type.googleapis.com/envoy.extensions.filters."

# The smallest proxy-wasm (ABI 0.2.1) filter Envoy accepts: it answers every request itself.
_WAT = f"""
(module
  (import "env" "proxy_send_local_response"
    (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{BODY.decode()}")
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 16) (i32.const {len(BODY)})
                      (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1))
)
"""


def _bootstrap(code: dict[str, Any], module_port: int | None) -> dict[str, Any]:
    wasm = {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": _TYPES + "http.wasm.v3.Wasm",
            "config": {"name": "fetched", "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": code}},
        },
    }
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": _TYPES + "http.router.v3.Router"},
    }
    fallback = {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "no"}}}
    hcm = {
        "@type": _TYPES + "network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [fallback]}]},
        "http_filters": [wasm, router],
    }
    clusters = []
    if module_port is not None:
        address = {"socket_address": {"address": "127.0.0.1", "port_value": module_port}}
        endpoints = [{"lb_endpoints": [{"endpoint": {"address": address}}]}]
        assignment = {"cluster_name": "wasm_cluster", "endpoints": endpoints}
        clusters.append(
            {"name": "wasm_cluster", "type": "STATIC", "connect_timeout": "2s", "load_assignment": assignment}
        )
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "main",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": clusters,
        }
    }


@pytest.mark.envoy
@pytest.mark.parametrize("mode", ["local", "remote"])
def test_envoy_runs_the_fetched_module(
    mode: str, basic_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = wasmtime.wat2wasm(_WAT)
    (tmp_path / "filter.wasm").write_bytes(module)
    creds = basic_registry.config_json(tmp_path / "config.json")
    ref = f"{basic_registry.host}/e2e/filter:{mode}"
    code, out, err = run(
        capsys,
        "wasm",
        "push",
        str(tmp_path / "filter.wasm"),
        ref,
        "--layout",
        "compat",
        "--pull-secret",
        str(creds),
        *basic_registry.cli_args(),
    )
    assert code == 0, err
    cache = ModuleCache(tmp_path / "cache")
    fetcher = ModuleFetcher(cache, FetchOptions(insecure_hosts=frozenset({basic_registry.host})))
    spec = {"type": "Image", "image": {"url": ref, "sha256": out.strip()}, "pullPolicy": "IfNotPresent"}
    fetcher.pull_image(ref, pull_secret=load_pull_secret(creds))
    with ModuleServer(cache) as server:
        handoff = LocalHandoff() if mode == "local" else HttpHandoff(server, cluster="wasm_cluster")
        envoy_block = envoy_code(spec, fetcher, handoff)
        if mode == "remote":
            assert envoy_block["remote"]["sha256"] == hashlib.sha256(module).hexdigest()
        bootstrap = _bootstrap(envoy_block, server.port if mode == "remote" else None)
        with Envoy(bootstrap, workdir=tmp_path / "envoy") as envoy:  # __enter__ starts it
            host, port = envoy.listener_address("main")
            with urllib.request.urlopen(f"http://{host}:{port}/anything", timeout=10) as response:
                assert response.status == 200
                assert response.read() == BODY
