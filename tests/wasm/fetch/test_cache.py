"""Cache behaviour: pull policies with a registry that goes down, two processes pulling at once,
LRU eviction under a size cap, garbage collection, metrics."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from sidecar.wasm.fetch.cache import ModuleCache
from tests.support.wait import wait_for
from tests.support.wasm_fetch import (
    Registry,
    ScriptedServer,
    assert_user_error,
    cache_files,
    make_module,
    pull_json,
    run,
)


def _push(capsys: pytest.CaptureFixture[str], reg: Registry, tmp_path: Path, module: bytes, ref: str) -> str:
    path = tmp_path / f"{hashlib.sha256(module).hexdigest()[:8]}.wasm"
    path.write_bytes(module)
    creds = reg.config_json(tmp_path / "config.json")
    code, out, err = run(capsys, "wasm", "push", str(path), ref, "--pull-secret", str(creds), *reg.cli_args())
    assert code == 0, err
    return out.strip()


def test_registry_down_keeps_if_not_present_working(
    own_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module_v1, module_v2 = make_module(200, seed="v1"), make_module(200, seed="v2")
    repo = f"{own_registry.host}/team/policy"
    digest = _push(capsys, own_registry, tmp_path, module_v1, f"{repo}:1.0")
    _push(capsys, own_registry, tmp_path, module_v1, f"{repo}:latest")
    creds = ("--pull-secret", str(tmp_path / "config.json"))
    args = ("--cache-dir", str(tmp_path / "cache"), *own_registry.cli_args(), "--timeout", "2")
    assert pull_json(capsys, f"{repo}:1.0", *args, *creds)["cache_hit"] is False
    assert pull_json(capsys, f"{repo}:latest", *args, *creds)["cache_hit"] is True  # Always: re-resolved, same digest

    # The tag moves: IfNotPresent keeps the cached module, Always (the :latest default) follows the tag.
    _push(capsys, own_registry, tmp_path, module_v2, f"{repo}:latest")
    _push(capsys, own_registry, tmp_path, module_v2, f"{repo}:1.0")
    assert pull_json(capsys, f"{repo}:1.0", *args)["sha256"] == hashlib.sha256(module_v1).hexdigest()
    latest = pull_json(capsys, f"{repo}:latest", *args, *creds)
    assert latest["sha256"] == hashlib.sha256(module_v2).hexdigest() and latest["cache_hit"] is False

    own_registry.process.terminate()
    own_registry.process.wait(timeout=10)
    start = time.monotonic()
    assert pull_json(capsys, f"{repo}:1.0", *args)["cache_hit"] is True
    assert pull_json(capsys, f"{repo}@{digest}", *args)["cache_hit"] is True
    assert time.monotonic() - start < 1.0  # no network round trip on these paths
    code, _, err = run(capsys, "wasm", "pull", f"{repo}:latest", *args, *creds)
    assert_user_error(code, err, "cannot reach registry", own_registry.host)
    code, _, err = run(capsys, "wasm", "pull", f"{repo}:2.0", *args, *creds)
    assert_user_error(code, err, "cannot reach registry")


def test_two_processes_pull_the_same_module(
    basic_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(8 << 20, seed="concurrent")
    ref = f"{basic_registry.host}/team/concurrent:1"
    _push(capsys, basic_registry, tmp_path, module, ref)
    cache = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "sidecar",
        "wasm",
        "pull",
        "--json",
        ref,
        "--cache-dir",
        str(cache),
        "--pull-secret",
        str(tmp_path / "config.json"),
        *basic_registry.cli_args(),
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out))
    sha = hashlib.sha256(module).hexdigest()
    assert [r["sha256"] for r in results] == [sha, sha]
    assert sorted(r["cache_hit"] for r in results) in ([False, True], [False, False])
    assert cache_files(cache) == [f"modules/{sha}.wasm"]
    assert (cache / "modules" / f"{sha}.wasm").read_bytes() == module
    wait_for(lambda: basic_registry.blob_gets("team/concurrent", f"sha256:{sha}") >= 1, 5, "access log")
    assert basic_registry.blob_gets("team/concurrent", f"sha256:{sha}") == 1  # downloaded once


def test_lru_eviction_under_the_cap(
    scripted_server_modules: tuple[str, list[bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host, modules = scripted_server_modules
    cache = tmp_path / "cache"
    args = ("--cache-dir", str(cache), "--insecure-registry", host, "--cache-max-bytes", "2500")
    first = pull_json(capsys, f"http://{host}/0.wasm", *args)
    pull_json(capsys, f"http://{host}/1.wasm", *args)
    # Make module 0 the most recently used, so module 1 is the one evicted.
    index = json.loads((cache / "index.json").read_text())
    index["modules"][first["sha256"]]["last_used"] = time.time() + 100
    (cache / "index.json").write_text(json.dumps(index))
    pull_json(capsys, f"http://{host}/2.wasm", *args)
    kept = {hashlib.sha256(m).hexdigest() for m in (modules[0], modules[2])}
    assert {p.removeprefix("modules/").removesuffix(".wasm") for p in cache_files(cache)} == kept
    code, out, _ = run(capsys, "wasm", "ls", "--json", "--cache-dir", str(cache))
    assert code == 0 and {e["sha256"] for e in json.loads(out)} == kept
    code, _, err = run(capsys, "wasm", "pull", f"http://{host}/big.wasm", *args)
    assert_user_error(code, err, "cache cap of 2500")


@pytest.fixture
def scripted_server_modules(scripted_server: ScriptedServer) -> tuple[str, list[bytes]]:
    modules = [make_module(1000, seed=f"lru{n}") for n in range(3)]
    for n, module in enumerate(modules):
        scripted_server.routes[f"/{n}.wasm"] = [(200, {}, module)]
    scripted_server.routes["/big.wasm"] = [(200, {}, make_module(3000))]
    return scripted_server.host, modules


def test_gc_removes_unreferenced_and_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = ModuleCache(tmp_path)
    module = make_module(100)
    sha = hashlib.sha256(module).hexdigest()
    with cache.temp_file() as (path, handle):
        handle.write(module)
        handle.flush()
        cache.store(path, sha, len(module), ["http:https://x/m.wasm"], "sha256:" + sha, "https://x/m.wasm")
    orphan = tmp_path / "modules" / ("0" * 64 + ".wasm")
    orphan.write_bytes(b"\0asm")
    stale = tmp_path / "tmp" / "fetch.crashed"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    code, out, _ = run(capsys, "wasm", "gc", "--json", "--cache-dir", str(tmp_path))
    assert code == 0
    assert json.loads(out) == {
        "removed_modules": 1,
        "removed_bytes": 4,
        "removed_temp_files": 1,
        "removed_corrupt": 0,
        "index_rebuilt": False,
        "removed_compiled": 0,
        "removed_compiled_bytes": 0,
    }
    assert cache_files(tmp_path) == [f"modules/{sha}.wasm"]
    code, out, _ = run(capsys, "wasm", "gc", "--json", "--max-age", "0", "--cache-dir", str(tmp_path))
    assert json.loads(out)["removed_modules"] == 1
    assert cache_files(tmp_path) == []


def test_metrics_count_hits_misses_and_failures(
    scripted_server_modules: tuple[str, list[bytes]], tmp_path: Path
) -> None:
    from sidecar.wasm.fetch.errors import ChecksumMismatchError
    from sidecar.wasm.fetch.fetcher import ModuleFetcher
    from sidecar.wasm.fetch.transfer import FetchOptions

    host, _ = scripted_server_modules

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (
        value("wasm_cache_lookup_total", hit="true"),
        value("wasm_cache_lookup_total", hit="false"),
        value("wasm_remote_fetch_total", reason="checksum_mismatched"),
    )
    fetcher = ModuleFetcher(ModuleCache(tmp_path), FetchOptions(insecure_hosts=frozenset({host})))
    fetcher.pull_http(f"http://{host}/0.wasm")
    fetcher.pull_http(f"http://{host}/0.wasm")
    with pytest.raises(ChecksumMismatchError):
        fetcher.pull_http(f"http://{host}/1.wasm", sha256="a" * 64)
    after = (
        value("wasm_cache_lookup_total", hit="true"),
        value("wasm_cache_lookup_total", hit="false"),
        value("wasm_remote_fetch_total", reason="checksum_mismatched"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 2, 1]
    assert value("wasm_cache_entries") == 1
