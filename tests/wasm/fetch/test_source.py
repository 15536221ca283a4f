"""The translator entry point: EG `code` block -> fetch -> Envoy AsyncDataSource, local and HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from sidecar.errors import WasmError
from sidecar.wasm.fetch.cache import ModuleCache
from sidecar.wasm.fetch.fetcher import ModuleFetcher
from sidecar.wasm.fetch.handoff import ModuleServer
from sidecar.wasm.fetch.source import HttpHandoff, LocalHandoff, envoy_code
from sidecar.wasm.fetch.transfer import FetchOptions
from tests.support.wasm_fetch import PASSWORD, USER, Registry, ScriptedServer, make_module, run


def _as_envoy(code: dict[str, object]) -> base_pb2.AsyncDataSource:
    """Parse with Envoy's own message type: unknown or misspelled fields fail here."""
    return json_format.ParseDict(code, base_pb2.AsyncDataSource())


def _secret_manifest(reg: Registry) -> dict[str, object]:
    config = {"auths": {reg.host: {"username": USER, "password": PASSWORD}}}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "pull"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
    }


def test_image_source_to_local_and_remote_code(
    token_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(3000, seed="source")
    (tmp_path / "m.wasm").write_bytes(module)
    ref = f"{token_registry.host}/eg/filter:v3"
    creds = token_registry.config_json(tmp_path / "config.json")
    code, out, err = run(
        capsys,
        "wasm",
        "push",
        str(tmp_path / "m.wasm"),
        ref,
        "--layout",
        "compat",
        "--pull-secret",
        str(creds),
        *token_registry.cli_args(),
    )
    assert code == 0, err
    digest = out.strip()
    cache = ModuleCache(tmp_path / "cache")
    fetcher = ModuleFetcher(cache, FetchOptions(insecure_hosts=token_registry.insecure_hosts))
    spec = {
        "type": "Image",
        "image": {
            "url": f"oci://{ref}",
            "sha256": digest.removeprefix("sha256:"),
            "pullSecretRef": {"name": "pull"},
        },
    }
    secrets = {"pull": _secret_manifest(token_registry)}

    local = envoy_code(spec, fetcher, LocalHandoff(envoy_cache_dir="/envoy/wasm"), pull_secrets=secrets)
    sha = hashlib.sha256(module).hexdigest()
    assert local == {"local": {"filename": f"/envoy/wasm/modules/{sha}.wasm"}}
    assert _as_envoy(local).local.filename.endswith(f"{sha}.wasm")

    with ModuleServer(cache) as server:
        remote = envoy_code(spec, fetcher, HttpHandoff(server, cluster="wasm_cluster"), pull_secrets=secrets)
        parsed = _as_envoy(remote)
        assert parsed.remote.sha256 == sha
        assert parsed.remote.http_uri.cluster == "wasm_cluster"
        assert parsed.remote.retry_policy.num_retries.value == 10
        uri = parsed.remote.http_uri.uri
        assert sha not in uri  # unguessable: not derived from public data alone
        with urllib.request.urlopen(uri, timeout=5) as response:
            assert response.read() == module
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{server.base_url}/{sha}.wasm", timeout=5)
        assert info.value.code == 404
        info.value.close()


def test_http_source_and_spec_errors(scripted_server: ScriptedServer, tmp_path: Path) -> None:
    module = make_module(500, seed="eg-http")
    scripted_server.routes["/f.wasm"] = [(200, {}, module)]
    fetcher = ModuleFetcher(ModuleCache(tmp_path), FetchOptions(insecure_hosts=frozenset({scripted_server.host})))
    sha = hashlib.sha256(module).hexdigest()
    spec = {"type": "HTTP", "http": {"url": scripted_server.url("/f.wasm"), "sha256": sha}}
    code = envoy_code(spec, fetcher, LocalHandoff())
    assert Path(code["local"]["filename"]).read_bytes() == module

    bad_specs: list[tuple[dict[str, Any], str]] = [
        ({"type": "ConfigMap"}, "ConfigMap is not supported"),
        ({"type": "HTTP"}, "code.http: missing"),
        ({"type": "Image", "image": {"url": "r.example/x:1", "pullSecretRef": {"name": "nope"}}}, "'nope'"),
        ({"type": "HTTP", "http": {"url": scripted_server.url("/f.wasm")}, "pullPolicy": "Never"}, "Never"),
    ]
    for bad, needle in bad_specs:
        with pytest.raises(WasmError, match=needle):
            envoy_code(bad, fetcher, LocalHandoff())


def test_init_container_pull_then_sidecar_uses_cache(
    basic_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An init container (a separate process) pulls into the shared volume; the sidecar later turns
    the same EG spec into Envoy config from the cache alone, without credentials or network."""
    module = make_module(900, seed="init")
    (tmp_path / "m.wasm").write_bytes(module)
    creds = basic_registry.config_json(tmp_path / "config.json")
    ref = f"{basic_registry.host}/eg/init:v1"
    code, out, err = run(
        capsys, "wasm", "push", str(tmp_path / "m.wasm"), ref, "--pull-secret", str(creds), *basic_registry.cli_args()
    )
    assert code == 0, err
    shared = tmp_path / "shared"
    init = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "wasm",
            "pull",
            ref,
            "--sha256",
            out.strip(),
            "--cache-dir",
            str(shared),
            "--pull-secret",
            str(creds),
            *basic_registry.cli_args(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    fetcher = ModuleFetcher(ModuleCache(shared), FetchOptions(insecure_hosts=frozenset({basic_registry.host})))
    spec = {"type": "Image", "image": {"url": ref, "sha256": out.strip().removeprefix("sha256:")}}
    code_block = envoy_code(spec, fetcher, LocalHandoff())
    assert Path(code_block["local"]["filename"]).read_bytes() == module
