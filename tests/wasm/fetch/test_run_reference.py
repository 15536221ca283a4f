"""`sidecar wasm run REF`: a registry reference or URL is pulled (verified, cached) and then run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.support.wasm_fetch import Registry, ScriptedServer, assert_user_error, cache_files, run

# A proxy-wasm (ABI 0.2.1) filter that adds `x-wasm: pulled` to requests, assembled from text.
ADD_HEADER = r"""
(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 100) "x-wasm")
  (data (i32.const 200) "pulled")
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 0) (i32.const 100) (i32.const 6) (i32.const 200) (i32.const 6)))
    (i32.const 0))
)
"""


@pytest.fixture(scope="module")
def module_bytes() -> bytes:
    import wasmtime

    return bytes(wasmtime.wat2wasm(ADD_HEADER))


def _added_header(out: str) -> str | None:
    report = json.loads(out)
    headers = dict(report["upstream_request"]["headers"])
    value: str | None = headers.get("x-wasm")
    return value


def test_run_pulls_an_image_reference_then_runs_it(
    basic_registry: Registry, module_bytes: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "filter.wasm"
    path.write_bytes(module_bytes)
    creds = basic_registry.config_json(tmp_path / "config.json")
    ref = f"{basic_registry.host}/run/filter:v1"
    code, digest, err = run(capsys, "wasm", "push", str(path), ref, "--pull-secret", str(creds))
    assert code == 0, err
    cache = tmp_path / "cache"
    args = ["--cache-dir", str(cache), "--pull-secret", str(creds), "--json"]
    code, out, err = run(capsys, "wasm", "run", ref, *args)
    assert code == 0, err
    assert _added_header(out) == "pulled"
    assert cache_files(cache) == [f"modules/{hashlib.sha256(module_bytes).hexdigest()}.wasm"]
    # Pinned and already cached: runs with no credentials (a network call would be refused).
    code, out, err = run(capsys, "wasm", "run", f"{ref}@{digest.strip()}", "--cache-dir", str(cache), "--json")
    assert code == 0, err
    assert _added_header(out) == "pulled"
    # A digest that is not the image's: nothing runs.
    code, out, err = run(capsys, "wasm", "run", ref, *args, "--sha256", "0" * 64)
    assert_user_error(code, err, "sha256 says")
    assert out == ""


def test_run_pulls_a_url_and_checks_its_sha256(
    scripted_server: ScriptedServer, module_bytes: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted_server.routes["/filter.wasm"] = [(200, {}, module_bytes)]
    url = scripted_server.url("/filter.wasm")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    sha = hashlib.sha256(module_bytes).hexdigest()
    code, out, err = run(capsys, "wasm", "run", url, *cache, "--sha256", sha, "--json")
    assert code == 0, err
    assert _added_header(out) == "pulled"
    code, out, err = run(capsys, "wasm", "run", url, *cache, "--sha256", "1" * 64, "--policy", "Always")
    assert_user_error(code, err, "body has sha256")
    assert out == ""


@pytest.mark.parametrize(
    ("argument", "needle"),
    [
        ("missing/filter.wasm", "no such file"),
        ("./nothing-here", "no such file"),
        ("registry.example.invalid/Team/Filter:v1", "bad repository"),
    ],
)
def test_run_refuses_what_is_neither_a_file_nor_a_reference(
    argument: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "wasm", "run", argument, "--cache-dir", str(tmp_path))
    assert_user_error(code, err, needle)
    assert out == ""
