"""`sidecar up -f`: real processes, a reload by hot restart while a request is in flight, and bad input."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.net import free_port
from tests.support.translate_servers import NamedBackend
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy


def resources(port: int, backend_port: int, extra_filter: str = "") -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg}}
spec:
  gatewayClassName: eg
  listeners: [{{name: http, protocol: HTTP, port: {port}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: app}}
spec:
  parentRefs: [{{name: eg}}]
  rules:
    - backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: app}}]{extra_filter}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: app}}
spec:
  endpoints: [{{ip: {{address: 127.0.0.1, port: {backend_port}}}}}]
"""


class Up:
    """`python -m sidecar up ARGS` with stderr collected line by line."""

    def __init__(self, *args: str) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "up", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting with {prefix!r}; got {self.seen}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


@pytest.fixture
def app() -> Iterator[NamedBackend]:
    server = NamedBackend("app")
    yield server
    server.close()


def test_up_f_serves_and_reloads_without_dropping_an_in_flight_request(tmp_path: Path, app: NamedBackend) -> None:
    port = free_port()
    config = tmp_path / "eg.yaml"
    config.write_text(resources(port, app.port))
    up = Up("-f", str(tmp_path))
    try:
        line = up.wait_line("listener default/eg/http")
        url = line.split()[-1].rstrip("/")
        assert url == f"http://127.0.0.1:{port}"
        first = httpx.get(url + "/hello", timeout=10)
        assert first.text == "app /hello" and "x-version" not in first.headers

        result: dict[str, httpx.Response] = {}
        slow = threading.Thread(target=lambda: result.update(r=httpx.get(url + "/slow", timeout=30)))
        slow.start()
        wait_for(lambda: "/slow" in app.paths, 30, "the slow request to reach the backend")
        config.write_text(
            resources(
                port,
                app.port,
                """
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-version, value: "2"}]}""",
            )
        )
        up.wait_line("reloaded")
        assert httpx.get(url + "/hello", timeout=10).headers.get("x-version") == "2"
        slow.join(30)
        assert result["r"].status_code == 200 and result["r"].text == "app /slow"

        # A bad edit is reported and the running config keeps serving.
        config.write_text(resources(port, app.port).replace("kind: Backend\n", "kind: Backnd\n"))
        assert "unknown kind 'Backnd'" in up.wait_line("reload failed")
        assert httpx.get(url + "/hello", timeout=10).headers.get("x-version") == "2"

        # And a second hot restart (epoch 2) once the file is good again.
        config.write_text(
            resources(
                port,
                app.port,
                """
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-version, value: "3"}]}""",
            )
        )
        up.wait_line("reloaded")
        assert httpx.get(url + "/hello", timeout=10).headers.get("x-version") == "3"
    finally:
        assert up.stop() == 0


BAD_INPUTS = {
    "unknown-kind": ("kind: Backend\n", "kind: Bakend\n", "unknown kind 'Bakend'"),
    "unknown-field": ("  endpoints:", "  endpoint: []\n  endpoints:", "Backend/default/app: spec.endpoint: unknown"),
    # (A backendRef to a missing Backend is no longer an input error: as in EG, its share answers 500.)
    "missing-target": (
        "parentRefs: [{name: eg}]",
        "parentRefs: [{name: nothing}]",
        "HTTPRoute/default/app: spec.parentRefs[0].name: no Gateway default/nothing",
    ),
}


def _bad(text: str, case: str) -> str:
    old, new, _ = BAD_INPUTS[case]
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_up_f_bad_input_exits_2_with_one_line_and_starts_nothing(tmp_path: Path, case: str) -> None:
    port = free_port()
    config = tmp_path / "eg.yaml"
    config.write_text(_bad(resources(port, 9), case))
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "up", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sidecar: error: {config}"), proc.stderr
    assert BAD_INPUTS[case][2] in lines[0]
    assert not list(tmp_path.glob("sidecar-up-*/envoy-0/envoy.log"))  # Envoy never started
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


SIDECAR_RESOURCES = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg}}
spec:
  gatewayClassName: eg
  listeners: [{{name: http, protocol: HTTP, port: {port}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: myapp}}
spec:
  parentRefs: [{{name: eg}}]
  rules:
    - backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: echo}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: echo}}
spec:
  endpoints: [{{ip: {{address: 127.0.0.1, port: {echo_port}}}}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata:
  name: envoy-sidecar
  annotations: {{envoy-sidecar/extproc: "true"}}
spec:
  endpoints: [{{unix: {{path: /var/run/envoy-sidecar/extproc.sock}}}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {{name: ext-proc-example}}
spec:
  targetRef: {{group: gateway.networking.k8s.io, kind: HTTPRoute, name: myapp}}
  extProc:
  - backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: envoy-sidecar}}]
"""


def test_up_f_runs_this_sidecar_as_the_ext_proc_backend_with_the_chains_processing_mode(tmp_path: Path) -> None:
    from sidecar.chains import Registry, describe_mode
    from sidecar.config import load_config
    from sidecar.stack.demo import EchoBackend
    from sidecar.stack.files import Stack, StackOptions
    from sidecar.stack.up import demo_config_path

    port = free_port()
    with EchoBackend() as echo:
        config = tmp_path / "eg.yaml"
        config.write_text(SIDECAR_RESOURCES.format(port=port, echo_port=echo.address[1]))
        workdir = tmp_path / "work"
        workdir.mkdir()
        stack = Stack(StackOptions(files=(config,), workers=2), workdir)
        try:
            stack.start()
            assert stack.sidecar is not None and stack.envoy is not None
            [(name, url, hostnames)] = stack.urls()
            assert (name, url, hostnames) == ("default/eg/http", f"http://127.0.0.1:{port}", [])
            response = httpx.get(url + "/hi", timeout=10)
            assert response.json()["headers"]["x-stamped-by"] == "envoy-sidecar-demo"
            hcm = stack.envoy.bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            filters = hcm["typed_config"]["http_filters"]
            [ext_proc] = [f for f in filters if f["name"].startswith("envoy.filters.http.ext_proc")]
            registry = Registry.from_specs(load_config(demo_config_path()).chains)
            wanted = {k: v for k, v in describe_mode(registry.mode).items() if v not in ("SKIP", "NONE")}
            got = {k: v for k, v in ext_proc["typed_config"]["processing_mode"].items() if v not in ("SKIP", "NONE")}
            assert got == wanted and got["request_body_mode"] == "BUFFERED"
            assert ext_proc["typed_config"]["message_timeout"] == "0.500s"
            metadata = ext_proc["typed_config"]["metadata_options"]
            assert metadata["receiving_namespaces"] == {"untyped": ["envoy-sidecar"]}
            [cluster] = [
                c
                for c in stack.envoy.bootstrap["static_resources"]["clusters"]
                if c["name"] == ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
            ]
            sockets = [
                e["endpoint"]["address"]["pipe"]["path"]
                for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            ]
            assert sockets == [str(workdir / "extproc-0.sock"), str(workdir / "extproc-1.sock")]
            assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == (
                "envoy.service.ext_proc.v3.ExternalProcessor"
            )
            assert {httpx.get(url + f"/{i}", timeout=10).json()["headers"]["x-stamped-by"] for i in range(6)} == {
                "envoy-sidecar-demo"
            }
        finally:
            stack.close()
