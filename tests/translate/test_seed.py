"""Every YAML example of the seed feature list (EG 1.1 highlights, read from ../shared), verbatim, completed
into a runnable set, renders and passes `envoy --mode validate`; the extProc one also runs."""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import wasmtime
import yaml

from sidecar.errors import ConfigError
from sidecar.stack.envoy import Envoy, validate_bootstrap
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from tests.support.translate_servers import DnsServer, ExtProcRecorder, NamedBackend
from tests.support.wait import wait_for
from tests.support.wat import MODULE_WAT

SEED = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "eg-1.1-highlights.md"
pytestmark = [pytest.mark.envoy, pytest.mark.skipif(not SEED.is_file(), reason="seed list (../shared) not present")]


def seed_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", SEED.read_text(), re.S) if SEED.is_file() else []


BLOCKS = seed_blocks()


def _name(block: str) -> str:
    docs = [d for d in yaml.safe_load_all(block) if d]
    return "+".join(f"{d['kind']}-{d['metadata']['name']}" for d in docs)


def complete(block: str, *app_ports: int, ext_proc_ip: str = "127.0.0.1") -> str:
    """The seed block plus what it refers to: a Gateway `eg`, the HTTPRoutes its policies target (to
    one Backend per port in `app_ports`), the pull Secret and the extProc Service."""
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(block) if d]
    extra: list[dict[str, Any]] = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "eg"},
            "spec": {"gatewayClassName": "eg", "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]},
        },
    ]
    for i, port in enumerate(app_ports):
        endpoint = {"ip": {"address": "127.0.0.1", "port": port}}
        extra.append(
            {
                "apiVersion": "gateway.envoyproxy.io/v1alpha1",
                "kind": "Backend",
                "metadata": {"name": f"app-{i}"},
                "spec": {"endpoints": [endpoint]},
            }
        )
    routes = {d["metadata"]["name"] for d in docs if d["kind"] == "HTTPRoute"}
    for doc in docs:
        spec = doc.get("spec") or {}
        for ref in [spec["targetRef"]] if "targetRef" in spec else spec.get("targetRefs") or []:
            if ref["kind"] == "HTTPRoute" and ref["name"] not in routes:
                routes.add(ref["name"])
                apps = [
                    {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": f"app-{i}"}
                    for i in range(len(app_ports))
                ]
                extra.append(
                    {
                        "apiVersion": "gateway.networking.k8s.io/v1",
                        "kind": "HTTPRoute",
                        "metadata": {"name": ref["name"]},
                        "spec": {"parentRefs": [{"name": "eg"}], "rules": [{"backendRefs": apps}]},
                    }
                )
        for wasm in spec.get("wasm") or []:
            secret = (wasm["code"].get("image") or {}).get("pullSecretRef")
            if secret:
                extra.append(
                    {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "metadata": {"name": secret["name"]},
                        "type": "kubernetes.io/dockerconfigjson",
                        "stringData": {".dockerconfigjson": '{"auths": {}}'},
                    }
                )
        for ext in spec.get("extProc") or []:
            for ref in ext["backendRefs"]:
                extra.append(
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "metadata": {"name": ref["name"]},
                        "spec": {"clusterIP": ext_proc_ip, "ports": [{"port": ref["port"]}]},
                    }
                )
    if any(d["kind"] == "HTTPRoute" for d in docs):
        # The Backend example: its route points at httpbin.org; keep it, the Gateway is what it needs.
        extra = [d for d in extra if d["kind"] != "Backend"]
    return block + "---\n" + yaml.safe_dump_all(extra)


def _client_ip_on_the_gateway(block: str) -> str:
    """The release post's ClientTrafficPolicy targets an HTTPRoute, which EG's CRD refuses; EG takes it on the
    route's Gateway."""
    docs = [d for d in yaml.safe_load_all(block) if d]
    for doc in docs:
        if doc["kind"] == "ClientTrafficPolicy" and doc["spec"]["targetRef"]["kind"] == "HTTPRoute":
            doc["spec"]["targetRef"] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "eg"}
    return yaml.safe_dump_all(docs)


def test_seed_client_ip_example_on_a_route_is_refused_as_egs_crd_refuses_it(tmp_path: Path) -> None:
    [block] = [b for b in BLOCKS if "kind: ClientTrafficPolicy" in b]
    path = tmp_path / "seed.yaml"
    path.write_text(complete(block, 8080))
    with pytest.raises(ConfigError) as refused:
        render_bootstrap([path], RenderOptions(ephemeral_ports=True))
    assert "ClientTrafficPolicy/default/enable-client-ip-detection: spec.targetRef.kind: expected Gateway" in str(
        refused.value
    )


@pytest.mark.parametrize("block", BLOCKS, ids=[_name(b) for b in BLOCKS])
def test_seed_example_renders_and_validates(tmp_path: Path, block: str) -> None:
    block = _client_ip_on_the_gateway(block)
    module = tmp_path / "module.wasm"
    module.write_bytes(bytes(wasmtime.wat2wasm(MODULE_WAT)))
    fetched: list[dict[str, Any]] = []

    def fetch(code: dict[str, Any], pull_secrets: dict[str, Any]) -> dict[str, Any]:
        # The seam the OCI fetcher plugs into; here every source "resolves" to the test module.
        fetched.append(code)
        return {"local": {"filename": str(module)}}

    path = tmp_path / "seed.yaml"
    path.write_text(complete(block, 8080))
    bootstrap = render_bootstrap(
        [path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True, fetch_module=fetch)
    )
    validate_bootstrap(bootstrap)
    text = yaml.safe_dump(bootstrap)
    docs = [d for d in yaml.safe_load_all(block) if d]
    kinds = {d["kind"] for d in docs}
    if any(d["spec"].get("wasm") for d in docs):
        assert fetched and "envoy.filters.http.wasm/envoyextensionpolicy/default/" in text
    if any(d["spec"].get("extProc") for d in docs):
        assert "envoy.filters.http.ext_proc/envoyextensionpolicy/default/ext-proc-example/extproc/0" in text
    if "SecurityPolicy" in kinds:
        assert "RBACPerRoute" in text
    if "ClientTrafficPolicy" in kinds:
        # EG's listener: the XFF detection extension (numTrustedHops 1 -> xff_num_trusted_hops 0), not the HCM's.
        assert "envoy.extensions.http.original_ip_detection.xff" in text and "use_remote_address: false" in text
        assert "xff_num_trusted_hops: 1" not in text
    if "BackendTrafficPolicy" in kinds:
        assert "MAGLEV" in text and "source_ip: true" in text
    if "Backend" in kinds:
        assert "httpbin.org" in text and "STRICT_DNS" in text


def test_seed_ext_proc_example_sees_streamed_response_bodies(tmp_path: Path) -> None:
    [block] = [b for b in BLOCKS if "extProc" in b]
    ip = f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}"  # the seed fixes port 9002; vary the IP
    recorder = ExtProcRecorder(f"{ip}:9002")
    app = NamedBackend("app")
    try:
        path = tmp_path / "seed.yaml"
        path.write_text(complete(block, app.port, ext_proc_ip=ip))
        bootstrap = render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
        with Envoy(bootstrap, workdir=tmp_path / "envoy") as envoy:
            host, port = envoy.listener_address("default/eg/http")
            response = httpx.get(f"http://{host}:{port}/seed", timeout=10)
        assert response.text == "app /seed"
        bodies = [chunk for phase, (chunk, _) in ((p, v) for p, v in recorder.seen if p == "response_body")]
        assert b"".join(bodies) == b"app /seed"
        assert recorder.phases()[0] == "request_headers"
    finally:
        app.close()
        recorder.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the seed's Backend is httpbin.org port 80: binding it needs root")
def test_seed_backend_example_serves_through_dns(tmp_path: Path) -> None:
    """The Backend example verbatim: httpbin.org:80, resolved by a loopback DNS server to a loopback
    address other than 127.0.0.1 (so port 80 is free) where a test backend answers."""
    [block] = [b for b in BLOCKS if "kind: Backend\n" in b]
    ip = f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}"
    httpbin = NamedBackend("httpbin", address=(ip, 80))
    dns = DnsServer({"httpbin.org": ip})
    try:
        path = tmp_path / "seed.yaml"
        path.write_text(complete(block))
        bootstrap = render_bootstrap(
            [path],
            RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True, dns_resolver=("127.0.0.1", dns.port)),
        )
        with Envoy(bootstrap, workdir=tmp_path / "envoy") as envoy:
            host, port = envoy.listener_address("default/eg/http")

            def fetch() -> httpx.Response:
                return httpx.get(f"http://{host}:{port}/get", headers={"host": "www.example.com"}, timeout=10)

            wait_for(lambda: fetch().status_code == 200, what="httpbin.org to resolve")
            assert fetch().text == "httpbin /get"
        assert "httpbin.org" in dns.queries
    finally:
        dns.close()
        httpbin.close()


@contextlib.contextmanager
def running(tmp_path: Path, text: str) -> Iterator[str]:
    """Render `text`, run it in Envoy, give the listener's URL."""
    path = tmp_path / "seed.yaml"
    path.write_text(text)
    bootstrap = render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
    with Envoy(bootstrap, workdir=tmp_path / "envoy") as envoy:
        host, port = envoy.listener_address("default/eg/http")
        yield f"http://{host}:{port}"


def test_seed_ip_allow_list_example_runs(tmp_path: Path) -> None:
    [block] = [b for b in BLOCKS if "kind: SecurityPolicy" in b]
    [ctp] = [_client_ip_on_the_gateway(b) for b in BLOCKS if "kind: ClientTrafficPolicy" in b]
    app = NamedBackend("app")
    try:
        with running(tmp_path, complete(block + "---\n" + ctp, app.port)) as url:
            statuses = [
                httpx.get(url + "/", headers={"x-forwarded-for": ip}, timeout=10).status_code
                for ip in ("10.0.1.4", "10.0.2.250", "10.0.3.1", "192.0.2.1")
            ]
        assert statuses == [200, 200, 403, 403]
    finally:
        app.close()


def test_seed_source_ip_session_persistence_example_runs(tmp_path: Path) -> None:
    [block] = [b for b in BLOCKS if "kind: BackendTrafficPolicy" in b]
    apps = [NamedBackend(f"app-{i}") for i in range(3)]
    try:
        with running(tmp_path, complete(block, *(a.port for a in apps))) as url:
            hits = {httpx.get(url + "/", timeout=10).headers["x-backend"] for _ in range(20)}
        assert len(hits) == 1
    finally:
        for app in apps:
            app.close()
