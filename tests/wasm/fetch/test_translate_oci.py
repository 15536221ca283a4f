"""`sidecar render` / `sidecar up` with an OCI Wasm image from a private registry: the translator, the
fetcher and a real Envoy together (the seed list's `code.type: Image` example, made runnable)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import wasmtime

from sidecar.errors import ConfigError
from sidecar.stack.envoy import Envoy, validate_bootstrap
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from sidecar.translate.wasmsource import fetch_module
from tests.support.translate_kit import GATEWAY, backend, get, route
from tests.support.translate_servers import NamedBackend
from tests.support.wasm_fetch import Registry, run
from tests.support.wat import MODULE_WAT

IMAGE_POLICY = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {{name: oci-wasm-source-test}}
spec:
  targetRef: {{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app}}
  wasm:
  - name: wasm-filter
    code:
      type: Image
      image:
        url: "oci://{ref}"
        sha256: "{sha256}"
        pullSecretRef: {{name: pull}}
"""


@pytest.mark.envoy
def test_private_oci_wasm_image_is_pulled_verified_and_run(
    basic_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = bytes(wasmtime.wat2wasm(MODULE_WAT))
    (tmp_path / "filter.wasm").write_bytes(module)
    creds = basic_registry.config_json(tmp_path / "config.json")
    ref = f"{basic_registry.host}/filters/add-header:v1"
    code, out, err = run(
        capsys,
        "wasm",
        "push",
        str(tmp_path / "filter.wasm"),
        ref,
        "--pull-secret",
        str(creds),
        *basic_registry.cli_args(),
    )
    assert code == 0, err
    manifest_digest = out.strip().removeprefix("sha256:")

    app = NamedBackend("app")
    try:
        inputs = tmp_path / "in.yaml"
        secret = basic_registry.secret_manifest(tmp_path / "secret.yaml").read_text()
        endpoint = f"{{ip: {{address: 127.0.0.1, port: {app.port}}}}}"
        routing = GATEWAY + route("app", "/", "app") + backend("app", endpoint)
        inputs.write_text(routing + "---\n" + secret + IMAGE_POLICY.format(ref=ref, sha256=manifest_digest))
        cache = tmp_path / "cache"
        options = RenderOptions(
            listen_address="127.0.0.1",
            ephemeral_ports=True,
            fetch_module=lambda code, secrets: fetch_module(code, cache, pull_secrets=secrets),
        )
        bootstrap = render_bootstrap([inputs], options)
        module_file = cache / "modules" / f"{hashlib.sha256(module).hexdigest()}.wasm"
        assert module_file.read_bytes() == module  # the module's own sha256 names the file Envoy loads
        assert str(module_file) in str(bootstrap)
        validate_bootstrap(bootstrap)
        with Envoy(bootstrap, workdir=tmp_path / "envoy") as envoy:
            host, port = envoy.listener_address("default/eg/http")
            response = get(f"http://{host}:{port}", "/")
        assert response.status_code == 200
        assert response.headers["x-wasm"] == "hello"

        # EG's semantics: the sha256 is the manifest digest; a wrong one fails, naming the policy.
        inputs.write_text(routing + "---\n" + secret + IMAGE_POLICY.format(ref=ref, sha256="0" * 64))
        where = r"EnvoyExtensionPolicy/default/oci-wasm-source-test: spec\.wasm\[0\]\.code: .*but sha256 says"
        with pytest.raises(ConfigError, match=where):
            render_bootstrap(
                [inputs],
                RenderOptions(
                    fetch_module=lambda code, secrets: fetch_module(code, tmp_path / "c2", pull_secrets=secrets)
                ),
            )
    finally:
        app.close()
