"""Wasm with `code.type: HTTP`: a hand-written proxy-wasm module, served over HTTP on loopback, fetched and
verified before Envoy starts, then run by Envoy's V8 runtime."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import wasmtime

from sidecar.errors import ConfigError
from sidecar.stack.envoy import Envoy, validate_bootstrap
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from sidecar.translate.wasmsource import fetch_module
from tests.support.translate_servers import NamedBackend
from tests.support.wat import MODULE_WAT


class _Serve(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_GET(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        body: bytes = self.server.module  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def module_server() -> Iterator[ThreadingHTTPServer]:
    module = bytes(wasmtime.wat2wasm(MODULE_WAT))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Serve)
    server.module = module  # type: ignore[attr-defined]
    server.hits = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def module_url(module_server: ThreadingHTTPServer) -> tuple[str, str]:
    """(URL, sha256) of the module."""
    digest = hashlib.sha256(module_server.module).hexdigest()  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{module_server.server_address[1]}/filter.wasm", digest


def _resources(backend_port: int, url: str, sha256: str) -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg}}
spec:
  gatewayClassName: eg
  listeners: [{{name: http, protocol: HTTP, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: http-with-http-wasm-source}}
spec:
  parentRefs: [{{name: eg}}]
  rules:
    - backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: app}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: app}}
spec:
  endpoints: [{{ip: {{address: 127.0.0.1, port: {backend_port}}}}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata:
  name: http-wasm-source-test
spec:
  targetRef:
    group: gateway.networking.k8s.io
    kind: HTTPRoute
    name: http-with-http-wasm-source
  wasm:
  - name: wasm-filter
    rootID: my_root_id
    config: {{greeting: hello}}
    env: {{hostKeys: [HOME]}}
    code:
      type: HTTP
      http:
        url: {url}
        sha256: {sha256}
"""


@pytest.mark.envoy
def test_http_wasm_module_is_fetched_verified_and_runs(tmp_path: Path, module_url: tuple[str, str]) -> None:
    url, sha256 = module_url
    app = NamedBackend("app")
    try:
        path = tmp_path / "wasm.yaml"
        path.write_text(_resources(app.port, url, sha256))
        cache = tmp_path / "cache"
        options = RenderOptions(
            listen_address="127.0.0.1",
            ephemeral_ports=True,
            fetch_module=lambda code, _secrets: fetch_module(code, cache),
        )
        bootstrap = render_bootstrap([path], options)
        assert (cache / "modules" / f"{sha256}.wasm").read_bytes()[:4] == b"\0asm"
        validate_bootstrap(bootstrap)
        with Envoy(bootstrap, workdir=tmp_path / "envoy") as envoy:
            host, port = envoy.listener_address("default/eg/http")
            response = httpx.get(f"http://{host}:{port}/", timeout=10)
        assert response.status_code == 200 and response.text == "app /"
        assert response.headers["x-wasm"] == "hello"
    finally:
        app.close()


def test_sha256_mismatch_is_a_config_error_naming_the_policy(tmp_path: Path, module_url: tuple[str, str]) -> None:
    url, _ = module_url
    path = tmp_path / "wasm.yaml"
    path.write_text(_resources(9, url, "f" * 64))
    with pytest.raises(ConfigError) as info:
        render_bootstrap([path], RenderOptions(fetch_module=lambda code, _: fetch_module(code, tmp_path / "cache")))
    message = str(info.value)
    assert message.startswith(f"{path}#3: EnvoyExtensionPolicy/default/http-wasm-source-test: spec.wasm[0].code: ")
    assert "but sha256 says " + "f" * 64 in message
    modules = tmp_path / "cache" / "modules"
    assert not modules.exists() or not list(modules.iterdir())  # nothing cached


def test_unreachable_registry_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot reach registry 127\.0\.0\.1:1"):
        fetch_module({"type": "Image", "image": {"url": "oci://127.0.0.1:1/filter:v1"}}, tmp_path)


def test_a_verified_module_is_not_downloaded_again(
    tmp_path: Path, module_server: ThreadingHTTPServer, module_url: tuple[str, str]
) -> None:
    url, sha256 = module_url
    code = {"type": "HTTP", "http": {"url": url, "sha256": sha256}}
    first = fetch_module(code, tmp_path)
    expected = {"local": {"filename": str(tmp_path / "modules" / f"{sha256}.wasm")}}
    assert fetch_module(code, tmp_path) == first == expected
    unpinned = fetch_module({"type": "HTTP", "http": {"url": url}}, tmp_path)  # IfNotPresent: cached by URL
    assert unpinned == first
    assert module_server.hits == 1  # type: ignore[attr-defined]
    fetch_module({"type": "HTTP", "http": {"url": url}, "pullPolicy": "Always"}, tmp_path)
    assert module_server.hits == 2  # type: ignore[attr-defined]
