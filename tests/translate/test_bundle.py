"""`sidecar render --format eg`: the bundle wires the sidecar in, and EG's CRD schemas accept every document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli import main
from tests.support.translate_crds import CRDS, crd_schemas
from tests.support.translate_kit import SIDECAR_ROUTE

INPUT = (
    SIDECAR_ROUTE
    + """apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: ext-proc-example}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: myapp}
  extProc:
  - backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: envoy-sidecar}]
"""
)


def render(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, *extra: str) -> tuple[int, str]:
    path = tmp_path / "in.yaml"
    path.write_text(text)
    sidecar = tmp_path / "sidecar.yaml"
    sidecar.write_text("workers: 2\nplugins:\n  - use: header-stamp\n")
    code = main(["render", "--format", "eg", "-f", str(path), "--sidecar-config", str(sidecar), *extra])
    captured = capsys.readouterr()
    return code, captured.out if code == 0 else captured.err


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_bundle_wires_the_sidecar_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = render(tmp_path, capsys, INPUT, "--image", "registry.example.com/envoy-sidecar:1.0")
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    backend = by_kind(docs, "Backend", "envoy-sidecar")
    assert backend["spec"]["endpoints"] == [
        {"unix": {"path": "/var/run/envoy-sidecar/extproc-0.sock"}},
        {"unix": {"path": "/var/run/envoy-sidecar/extproc-1.sock"}},
    ]
    # header-stamp has request and response header hooks and no body hooks.
    policy = by_kind(docs, "EnvoyExtensionPolicy", "ext-proc-example")
    assert policy["spec"]["extProc"][0]["processingMode"] == {"allowModeOverride": True, "request": {}, "response": {}}
    gateway = by_kind(docs, "Gateway", "eg")
    assert gateway["spec"]["infrastructure"]["parametersRef"]["name"] == "eg-envoy-sidecar"
    proxy = by_kind(docs, "EnvoyProxy", "eg-envoy-sidecar")
    pod = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["patch"]["value"]["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "envoy-sidecar")
    assert sidecar["image"] == "registry.example.com/envoy-sidecar:1.0"
    assert sidecar["args"][-4:] == ["--listen", "unix:/var/run/envoy-sidecar/extproc.sock", "--workers", "2"]
    assert "plugins:" in by_kind(docs, "ConfigMap", "envoy-sidecar-config")["data"]["sidecar.yaml"]
    second = render(tmp_path, capsys, INPUT, "--image", "registry.example.com/envoy-sidecar:1.0")[1]
    assert second == out  # deterministic


@pytest.mark.skipif(not CRDS.is_dir(), reason="EG CRDs (../shared) not present")
def test_bundle_documents_satisfy_egs_crd_schemas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    docs = list(yaml.safe_load_all(render(tmp_path, capsys, INPUT)[1]))
    schemas = crd_schemas()
    checked = 0
    for doc in docs:
        if doc["kind"] in schemas:
            jsonschema.validate(doc, schemas[doc["kind"]])
            checked += 1
    assert checked == len(docs) - 1  # all but the core ConfigMap


def test_bundle_refuses_chains_eg_cannot_select(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = INPUT.replace(
        "metadata: {name: ext-proc-example}",
        "metadata: {name: ext-proc-example, annotations: {envoy-sidecar/chain: admin}}",
    )
    code, err = render(tmp_path, capsys, text)
    assert code == 2
    assert "EnvoyExtensionPolicy/default/ext-proc-example: metadata.annotations.envoy-sidecar/chain: EG cannot" in err


def test_bundle_refuses_loopback_backends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = render(
        tmp_path,
        capsys,
        INPUT.replace("{fqdn: {hostname: app.example.com, port: 80}}", "{ip: {address: 127.0.0.1, port: 80}}"),
    )
    assert code == 2
    assert "Backend/default/app: spec.endpoints[0].ip.address: 127.0.0.1 is a loopback address" in err


def test_bundle_patches_the_shared_envoy_proxy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyProxy
metadata: {name: custom-proxy-config, namespace: envoy-gateway-system}
spec:
  filterOrder: [{name: envoy.filters.http.wasm, before: envoy.filters.http.jwt_authn}]
"""
    code, out = render(tmp_path, capsys, INPUT + shared)
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    assert "infrastructure" not in by_kind(docs, "Gateway", "eg")["spec"]
    proxy = by_kind(docs, "EnvoyProxy", "custom-proxy-config")
    assert proxy["spec"]["filterOrder"] and proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["patch"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "EnvoyProxy"] == ["custom-proxy-config"]


def test_bundle_refuses_a_parameters_ref_naming_no_envoy_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """EG would run that Gateway's Envoy without the sidecar container: one line, exit 2."""
    text = INPUT.replace(
        "  gatewayClassName: eg\n",
        "  gatewayClassName: eg\n  infrastructure:\n"
        "    parametersRef: {group: gateway.envoyproxy.io, kind: EnvoyProxy, name: missing}\n",
    )
    assert text != INPUT
    code, err = render(tmp_path, capsys, text)
    assert code == 2
    assert "spec.infrastructure.parametersRef: no EnvoyProxy default/missing" in err and len(err.splitlines()) == 1
