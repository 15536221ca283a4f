"""`sidecar wasm run REF`: a registry reference or URL is pulled (verified, cached) and then run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.support.wasm_fetch import Registry, ScriptedServer, assert_user_error, cache_files, run
from tests.support.wat import ADD_HEADER


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
