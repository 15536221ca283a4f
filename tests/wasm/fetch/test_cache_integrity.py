"""The cache does not trust its disk: a module changed, truncated or swapped after it was cached is
never handed out. With the source reachable it is fetched again; without, the pull fails in one line
saying why. `gc` finds and removes what changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.wasm.fetch.cache import ModuleCache
from sidecar.wasm.fetch.fetcher import ModuleFetcher
from sidecar.wasm.fetch.source import LocalHandoff, envoy_code
from sidecar.wasm.fetch.transfer import FetchOptions
from tests.support.wasm_fetch import (
    Registry,
    ScriptedServer,
    assert_user_error,
    make_module,
    pull_json,
    run,
    serve_image,
)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(b"")


def _append(path: Path) -> None:
    with path.open("ab") as handle:
        handle.write(b"\0")


def _symlink_to_copy(path: Path) -> None:
    """A symlink to a file with the very same bytes: still refused (the cache hands out regular files)."""
    copy = path.parent.parent / "elsewhere.wasm"
    shutil.copy(path, copy)
    path.unlink()
    path.symlink_to(copy)


def _same_size_swap(path: Path) -> None:
    """Another valid module of the same size renamed over it, with the old mtime put back."""
    st = path.stat()
    other = path.parent.parent / "evil.wasm"
    other.write_bytes(make_module(st.st_size - 20, seed="evil")[: st.st_size].ljust(st.st_size, b"\0"))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)


def _rewrite_in_place_keep_mtime(path: Path) -> None:
    """Bytes changed in place and the mtime restored: only ctime tells, and it cannot be set back."""
    st = path.stat()
    _flip_byte(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "flip-byte": _flip_byte,
    "truncate-to-0": _truncate,
    "append": _append,
    "symlink-to-identical-copy": _symlink_to_copy,
    "same-size-swap": _same_size_swap,
    "in-place-mtime-restored": _rewrite_in_place_keep_mtime,
    "directory": _directory,
    "fifo": _fifo,
    "deleted": lambda path: path.unlink(),
}


@pytest.fixture
def http_module(scripted_server: ScriptedServer) -> tuple[str, bytes]:
    module = make_module(4000, seed="integrity")
    scripted_server.routes["/m.wasm"] = [(200, {}, module)]
    return scripted_server.url("/m.wasm"), module


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=list(CORRUPTIONS))
@pytest.mark.parametrize("pinned", [False, True], ids=["if-not-present", "sha256-pinned"])
def test_corrupt_cached_url_module_is_fetched_again(
    corrupt: str,
    pinned: bool,
    http_module: tuple[str, bytes],
    scripted_server: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, module = http_module
    sha = hashlib.sha256(module).hexdigest()
    args = ("--cache-dir", str(tmp_path), "--insecure-registry", scripted_server.host)
    pin = ("--sha256", sha) if pinned else ()
    first = pull_json(capsys, url, *args, *pin)
    assert pull_json(capsys, url, *args, *pin)["cache_hit"] is True  # unchanged: served from the cache
    CORRUPTIONS[corrupt](Path(first["path"]))
    again = pull_json(capsys, url, *args, *pin)
    assert again["cache_hit"] is False
    assert Path(again["path"]).read_bytes() == module
    assert not Path(again["path"]).is_symlink()
    assert scripted_server.hits["/m.wasm"] == 2
    assert pull_json(capsys, url, *args, *pin)["cache_hit"] is True  # healed


@pytest.mark.parametrize("corrupt", ["flip-byte", "truncate-to-0", "symlink-to-identical-copy", "same-size-swap"])
def test_corrupt_module_with_the_source_down_is_refused(
    corrupt: str,
    http_module: tuple[str, bytes],
    scripted_server: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, module = http_module
    sha = hashlib.sha256(module).hexdigest()
    args = ("--cache-dir", str(tmp_path), "--insecure-registry", scripted_server.host, "--retries", "0")
    path = Path(pull_json(capsys, url, *args, "--sha256", sha)["path"])
    CORRUPTIONS[corrupt](path)
    scripted_server.routes["/m.wasm"] = [(503, {}, b"down")]
    code, _, err = run(capsys, "wasm", "pull", url, *args, "--sha256", sha)
    assert_user_error(code, err, "HTTP 503", f"cached module sha256:{sha}", "removed")
    assert not os.path.lexists(path)


@pytest.mark.parametrize("corrupt", ["flip-byte", "truncate-to-0", "symlink-to-identical-copy"])
def test_corrupt_image_module_under_every_policy(
    corrupt: str, basic_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real registry: IfNotPresent on a tag, Always on :latest (same digest), and a digest pin all
    re-verify the cached module, and each fetches it again once it is bad."""
    module = make_module(3000, seed=f"policy-{corrupt}")
    (tmp_path / "m.wasm").write_bytes(module)
    creds = basic_registry.config_json(tmp_path / "config.json")
    repo = f"{basic_registry.host}/integrity/{corrupt}"
    for tag in ("1.0", "latest"):
        code, out, err = run(
            capsys,
            "wasm",
            "push",
            str(tmp_path / "m.wasm"),
            f"{repo}:{tag}",
            "--pull-secret",
            str(creds),
            *basic_registry.cli_args(),
        )
        assert code == 0, err
    digest = out.strip()
    args = ("--cache-dir", str(tmp_path / "cache"), "--pull-secret", str(creds), *basic_registry.cli_args())
    sha = hashlib.sha256(module).hexdigest()
    for ref in (f"{repo}:1.0", f"{repo}:latest", f"{repo}@{digest}"):
        first = pull_json(capsys, ref, *args)
        assert first["sha256"] == sha
        CORRUPTIONS[corrupt](Path(first["path"]))
        again = pull_json(capsys, ref, *args)
        assert again["cache_hit"] is False, ref
        assert Path(again["path"]).read_bytes() == module


def test_envoy_code_never_names_a_corrupt_file(
    http_module: tuple[str, bytes], scripted_server: ScriptedServer, tmp_path: Path
) -> None:
    url, module = http_module
    fetcher = ModuleFetcher(ModuleCache(tmp_path), FetchOptions(insecure_hosts=frozenset({scripted_server.host})))
    spec = {"type": "HTTP", "http": {"url": url, "sha256": hashlib.sha256(module).hexdigest()}}
    path = Path(envoy_code(spec, fetcher, LocalHandoff())["local"]["filename"])
    _symlink_to_copy(path)
    (path.parent.parent / "elsewhere.wasm").write_bytes(b"\0asm\x01\0\0\0")  # the link now points at other bytes
    again = Path(envoy_code(spec, fetcher, LocalHandoff())["local"]["filename"])
    assert not again.is_symlink() and again.read_bytes() == module


def test_unchanged_hits_do_not_rehash(
    http_module: tuple[str, bytes], scripted_server: ScriptedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path: a hit on an untouched file is an fstat, not a read of the module."""
    url, _ = http_module
    cache = ModuleCache(tmp_path)
    fetcher = ModuleFetcher(cache, FetchOptions(insecure_hosts=frozenset({scripted_server.host})))
    fetcher.pull_http(url)
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", counting_read)
    assert fetcher.pull_http(url).cache_hit is True
    assert reads == []
    os.chmod(cache.path_for(fetcher.pull_http(url).module.sha256), 0o644)  # ctime moves: hashed once more
    assert fetcher.pull_http(url).cache_hit is True
    assert reads != []


def test_gc_repairs_what_it_finds(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = {name: make_module(1000, seed=name) for name in ("a", "b", "c")}
    for name, module in modules.items():
        scripted_server.routes[f"/{name}.wasm"] = [(200, {}, module)]
    args = ("--cache-dir", str(tmp_path), "--insecure-registry", scripted_server.host)
    paths = {name: Path(pull_json(capsys, scripted_server.url(f"/{name}.wasm"), *args)["path"]) for name in modules}
    _flip_byte(paths["a"])
    _symlink_to_copy(paths["b"])
    code, out, _ = run(capsys, "wasm", "gc", "--json", "--cache-dir", str(tmp_path))
    assert code == 0
    result = json.loads(out)
    assert result["removed_corrupt"] == 2 and result["removed_modules"] == 2
    assert sorted(p.name for p in (tmp_path / "modules").iterdir()) == [paths["c"].name]
    code, out, _ = run(capsys, "wasm", "ls", "--json", "--cache-dir", str(tmp_path))
    assert [entry["sha256"] for entry in json.loads(out)] == [paths["c"].name.removesuffix(".wasm")] * 2
    again = pull_json(capsys, scripted_server.url("/a.wasm"), *args)
    assert again["cache_hit"] is False and Path(again["path"]).read_bytes() == modules["a"]


def test_output_copy_of_a_corrupt_cache_hit_is_refetched(
    http_module: tuple[str, bytes], scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, module = http_module
    args = ("--cache-dir", str(tmp_path / "cache"), "--insecure-registry", scripted_server.host)
    first = pull_json(capsys, url, *args)
    _flip_byte(Path(first["path"]))
    out = tmp_path / "envoy" / "filter.wasm"
    doc = pull_json(capsys, url, *args, "--output", str(out))
    assert doc["cache_hit"] is False and out.read_bytes() == module


def test_scripted_image_hit_is_verified_too(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(800, seed="scripted-image")
    digest = serve_image(scripted_server, "img/mod", module)
    ref = f"{scripted_server.host}/img/mod@{digest}"
    args = ("--cache-dir", str(tmp_path), "--insecure-registry", scripted_server.host)
    path = Path(pull_json(capsys, ref, *args)["path"])
    _truncate(path)
    scripted_server.routes.clear()  # the registry forgets the image: only the cache could answer
    code, _, err = run(capsys, "wasm", "pull", ref, *args)
    assert_user_error(code, err, "not found", "has 0 bytes", "removed")


def test_module_server_never_serves_through_a_symlink(
    http_module: tuple[str, bytes], scripted_server: ScriptedServer, tmp_path: Path
) -> None:
    """The HTTP hand-off opens the module itself: a link planted after publishing is a 404, not the
    link's target (Envoy would refuse a wrong sha256 anyway; this keeps other files from being served)."""
    import urllib.error
    import urllib.request

    from sidecar.wasm.fetch.handoff import ModuleServer

    url, module = http_module
    cache = ModuleCache(tmp_path)
    fetcher = ModuleFetcher(cache, FetchOptions(insecure_hosts=frozenset({scripted_server.host})))
    pulled = fetcher.pull_http(url).module
    with ModuleServer(cache) as server:
        served = server.publish(pulled)
        with urllib.request.urlopen(served, timeout=10) as response:
            assert response.read() == module
        secret = tmp_path / "secret.txt"
        secret.write_text("not a module")
        pulled.path.unlink()
        pulled.path.symlink_to(secret)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(served, timeout=10)
        assert refused.value.code == 404
        refused.value.close()
