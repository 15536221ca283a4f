"""The cache's own disk fails or lies: misshapen and corrupt indexes, symlinks planted in its layout,
a full or read-only filesystem. Each is one line and exit 2 (or healed silently), never a traceback,
never a half-written or unindexed file, never a write outside the cache root."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.wasm_fetch import ScriptedServer, assert_user_error, cache_files, make_module, pull_json, run

SHA = "a" * 64

# Whole-index corruption: set aside and rebuilt.
CORRUPT_INDEXES: dict[str, bytes] = {
    "empty-file": b"",
    "invalid-json": b'{"version": 1, "modules": {',
    "a-list": b"[1, 2, 3]",
    "a-string": b'"index"',
    "null": b"null",
    "version-2": b'{"version": 2, "modules": {}, "refs": {}}',
    "version-as-string": b'{"version": "1", "modules": {}, "refs": {}}',
    "modules-a-list": b'{"version": 1, "modules": [], "refs": {}}',
    "refs-missing": b'{"version": 1, "modules": {}}',
    "deeply-nested": b"[" * 200_000 + b"]" * 200_000,
    "binary": bytes(range(256)) * 4,
    "trailing-garbage": b'{"version": 1, "modules": {}, "refs": {}} and more',
    "nan-size": b'{"version": 1, "modules": NaN, "refs": {}}',
}

# Entry-level damage: the bad entries are dropped, the rest kept.
MISSHAPEN_ENTRIES: dict[str, dict[str, Any]] = {
    "size-a-string": {"modules": {SHA: {"size": "12", "last_used": 1.0}}},
    "size-negative": {"modules": {SHA: {"size": -1, "last_used": 1.0}}},
    "size-a-bool": {"modules": {SHA: {"size": True, "last_used": 1.0}}},
    "last-used-missing": {"modules": {SHA: {"size": 4}}},
    "module-a-list": {"modules": {SHA: [4, 1.0]}},
    "module-key-not-hex": {"modules": {"../../etc/passwd": {"size": 4, "last_used": 1.0}}},
    "ref-a-number": {"refs": {"http:x": 7}},
    "ref-module-a-list": {"refs": {"http:x": {"module": [SHA], "digest": "d", "source": "s"}}},
    "ref-to-unknown-module": {"refs": {"http:x": {"module": "b" * 64, "digest": "d", "source": "s"}}},
    "ref-digest-missing": {"refs": {"http:x": {"module": SHA, "source": "s"}}},
    "stamp-garbage": {"modules": {SHA: {"size": 4, "last_used": 1.0, "stamp": "x"}}},
    "last-used-infinite": {"modules": {SHA: {"size": 4, "last_used": 1e999}}},
}


@pytest.fixture
def served(scripted_server: ScriptedServer) -> tuple[ScriptedServer, bytes, bytes]:
    first, second = make_module(1000, seed="first"), make_module(1000, seed="second")
    scripted_server.routes["/first.wasm"] = [(200, {}, first)]
    scripted_server.routes["/second.wasm"] = [(200, {}, second)]
    return scripted_server, first, second


def _args(cache: Path, server: ScriptedServer) -> tuple[str, ...]:
    return ("--cache-dir", str(cache), "--insecure-registry", server.host)


def _all_commands_work(capsys: pytest.CaptureFixture[str], cache: Path, server: ScriptedServer) -> None:
    for argv in (("ls", "--json"), ("gc", "--json")):
        code, out, err = run(capsys, "wasm", *argv, "--cache-dir", str(cache))
        assert code == 0 and "Traceback" not in err, err
        json.loads(out)


@pytest.mark.parametrize("name", CORRUPT_INDEXES)
def test_corrupt_index_is_set_aside_and_rebuilt(
    name: str, served: tuple[ScriptedServer, bytes, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, first, second = served
    cache = tmp_path / "cache"
    kept = pull_json(capsys, server.url("/first.wasm"), *_args(cache, server))
    (cache / "index.json").write_bytes(CORRUPT_INDEXES[name])
    # A new ref pulls, an old one too (its module file is reused after re-hashing).
    assert pull_json(capsys, server.url("/second.wasm"), *_args(cache, server))["cache_hit"] is False
    again = pull_json(capsys, server.url("/first.wasm"), *_args(cache, server))
    assert again["sha256"] == kept["sha256"] and Path(again["path"]).read_bytes() == first
    assert (cache / "index.json.corrupt").read_bytes() == CORRUPT_INDEXES[name]
    _all_commands_work(capsys, cache, server)
    assert sorted(cache_files(cache)) == sorted(
        f"modules/{hashlib.sha256(m).hexdigest()}.wasm" for m in (first, second)
    )


@pytest.mark.parametrize("name", CORRUPT_INDEXES)
def test_ls_and_gc_repair_a_corrupt_index(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    module = make_module(200, seed="gc-rebuild")
    sha = hashlib.sha256(module).hexdigest()
    (cache / "modules").mkdir(parents=True)
    (cache / "modules" / f"{sha}.wasm").write_bytes(module)
    (cache / "modules" / f"{'0' * 64}.wasm").write_bytes(b"not what its name says")
    (cache / "index.json").write_bytes(CORRUPT_INDEXES[name])
    code, out, err = run(capsys, "wasm", "gc", "--json", "--cache-dir", str(cache))
    assert code == 0, err
    assert json.loads(out)["index_rebuilt"] is True
    assert cache_files(cache) == []  # rebuilt with the good module, which no source refers to: collected
    (cache / "index.json").write_bytes(CORRUPT_INDEXES[name])
    code, out, err = run(capsys, "wasm", "ls", "--json", "--cache-dir", str(cache))
    assert code == 0 and json.loads(out) == [], err


@pytest.mark.parametrize("name", MISSHAPEN_ENTRIES)
def test_misshapen_entries_are_dropped(
    name: str, served: tuple[ScriptedServer, bytes, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, _, _ = served
    cache = tmp_path / "cache"
    good = pull_json(capsys, server.url("/first.wasm"), *_args(cache, server))
    index = json.loads((cache / "index.json").read_text())
    for section, entries in MISSHAPEN_ENTRIES[name].items():
        index[section].update(entries)
    (cache / "index.json").write_text(json.dumps(index))
    hit = pull_json(capsys, server.url("/first.wasm"), *_args(cache, server))
    assert hit["cache_hit"] is True and hit["sha256"] == good["sha256"]  # the good entry survived
    _all_commands_work(capsys, cache, server)
    assert pull_json(capsys, server.url("/second.wasm"), *_args(cache, server))["cache_hit"] is False
    assert not (cache / "index.json.corrupt").exists()


# --- symlinks inside the cache ---


@pytest.mark.parametrize("directory", ["modules", "tmp", "locks"])
@pytest.mark.parametrize("dangling", [False, True])
def test_symlinked_cache_directory_is_refused(
    directory: str,
    dangling: bool,
    served: tuple[ScriptedServer, bytes, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, _, _ = served
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    cache.mkdir()
    if not dangling:
        outside.mkdir()
    (cache / directory).symlink_to(outside)
    for argv in (("pull", server.url("/first.wasm"), "--insecure-registry", server.host), ("ls",), ("gc",)):
        code, _, err = run(capsys, "wasm", *argv, "--cache-dir", str(cache))
        assert_user_error(code, err, f"{cache / directory}", "symlink")
    assert not outside.exists() or list(outside.iterdir()) == []


@pytest.mark.parametrize("lock", ["index.lock", "locks/source"])
def test_planted_lock_symlink_is_replaced_not_followed(
    lock: str, served: tuple[ScriptedServer, bytes, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, first, _ = served
    cache, target = tmp_path / "cache", tmp_path / "victim"
    pull_json(capsys, server.url("/second.wasm"), *_args(cache, server))  # creates the layout
    if lock == "index.lock":
        links = [cache / "index.lock"]
    else:  # every lock a pull of /first.wasm might take
        from sidecar.wasm.fetch.http import url_key

        name = hashlib.sha256(url_key(server.url("/first.wasm")).encode()).hexdigest()[:32]
        links = [cache / "locks" / f"{name}.lock"]
    for link in links:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(target)  # dangling: following it would create the victim file
    doc = pull_json(capsys, server.url("/first.wasm"), *_args(cache, server))
    assert Path(doc["path"]).read_bytes() == first
    assert not target.exists()
    assert all(not link.is_symlink() for link in links)


@pytest.mark.parametrize("kind", ["dangling", "to-a-file", "to-a-directory"])
def test_index_symlink_is_set_aside_not_followed(
    kind: str, served: tuple[ScriptedServer, bytes, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, _, _ = served
    cache, target = tmp_path / "cache", tmp_path / "victim"
    pull_json(capsys, server.url("/first.wasm"), *_args(cache, server))
    if kind == "to-a-file":
        target.write_text('{"version": 1, "modules": {}, "refs": {}}')
    elif kind == "to-a-directory":
        target.mkdir()
    (cache / "index.json").unlink()
    (cache / "index.json").symlink_to(target)
    before = target.read_text() if kind == "to-a-file" else None
    pull_json(capsys, server.url("/second.wasm"), *_args(cache, server))
    assert not (cache / "index.json").is_symlink()
    assert (cache / "index.json.corrupt").is_symlink()
    if kind == "to-a-file":
        assert target.read_text() == before  # never written through
    elif kind == "to-a-directory":
        assert list(target.iterdir()) == []
    else:
        assert not target.exists()


# --- a full or read-only filesystem ---


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the monkeypatched tests cover it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, capture_output=True)


def test_disk_full_during_download(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real ENOSPC: a 256 KiB tmpfs and a 1 MiB module."""
    big, small = make_module(1 << 20, seed="big"), make_module(1000, seed="small")
    scripted_server.routes["/big.wasm"] = [(200, {}, big)]
    scripted_server.routes["/small.wasm"] = [(200, {}, small)]
    with _tmpfs(tmp_path / "fs", "256k") as cache:
        code, _, err = run(capsys, "wasm", "pull", scripted_server.url("/big.wasm"), *_args(cache, scripted_server))
        assert_user_error(code, err, "No space left on device")
        assert cache_files(cache) == []
        doc = pull_json(capsys, scripted_server.url("/small.wasm"), *_args(cache, scripted_server))  # still usable
        assert Path(doc["path"]).read_bytes() == small


def test_read_only_filesystem(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real EROFS: hits still served, a miss is one line, a corrupt hit is refused (cannot be removed)."""
    good, other = make_module(1000, seed="ro-good"), make_module(1000, seed="ro-other")
    scripted_server.routes["/good.wasm"] = [(200, {}, good)]
    scripted_server.routes["/other.wasm"] = [(200, {}, other)]
    scripted_server.routes["/bad.wasm"] = [(200, {}, make_module(1000, seed="ro-bad"))]
    with _tmpfs(tmp_path / "fs", "4m") as cache:
        pull_json(capsys, scripted_server.url("/good.wasm"), *_args(cache, scripted_server))
        bad = Path(pull_json(capsys, scripted_server.url("/bad.wasm"), *_args(cache, scripted_server))["path"])
        data = bytearray(bad.read_bytes())
        data[100] ^= 1
        bad.write_bytes(bytes(data))
        subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True, capture_output=True)
        assert pull_json(capsys, scripted_server.url("/good.wasm"), *_args(cache, scripted_server))["cache_hit"] is True
        code, _, err = run(capsys, "wasm", "pull", scripted_server.url("/other.wasm"), *_args(cache, scripted_server))
        assert_user_error(code, err, "Read-only file system")
        code, _, err = run(capsys, "wasm", "pull", scripted_server.url("/bad.wasm"), *_args(cache, scripted_server))
        assert_user_error(code, err, "has changed", "cannot be removed", "Read-only file system")


@pytest.mark.parametrize("code_name", ["ENOSPC", "EACCES", "EROFS", "EDQUOT", "EIO"])
@pytest.mark.parametrize("where", ["download", "index-write", "rename", "temp-create"])
def test_filesystem_errors_are_one_line_and_leave_nothing(
    code_name: str,
    where: str,
    served: tuple[ScriptedServer, bytes, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Simulated with patched os calls (in addition to the real tmpfs cases): every step that writes."""
    server, first, _ = served
    cache = tmp_path / "cache"
    pull_json(capsys, server.url("/first.wasm"), *_args(cache, server))
    index_before = (cache / "index.json").read_bytes()
    failure = OSError(getattr(errno, code_name), os.strerror(getattr(errno, code_name)))

    def fail(*args: object, **kwargs: object) -> Any:
        raise failure

    if where == "download":
        real_fdopen = os.fdopen

        class FailingWrites:
            def __init__(self, handle: Any) -> None:
                self._handle = handle

            def write(self, data: bytes) -> int:
                raise failure

            def __getattr__(self, name: str) -> Any:
                return getattr(self._handle, name)

            def __enter__(self) -> FailingWrites:
                return self

            def __exit__(self, *exc: object) -> None:
                self._handle.close()

        def fdopen(fd: int, mode: str = "r", *args: Any) -> Any:
            handle = real_fdopen(fd, mode, *args)
            return FailingWrites(handle) if mode == "w+b" else handle  # only the download's temp file

        monkeypatch.setattr(os, "fdopen", fdopen)
    elif where == "index-write":
        monkeypatch.setattr(os, "fsync", fail)
    elif where == "rename":
        monkeypatch.setattr(os, "replace", fail)
    else:
        monkeypatch.setattr(tempfile, "mkstemp", fail)
    code, _, err = run(capsys, "wasm", "pull", server.url("/second.wasm"), *_args(cache, server))
    monkeypatch.undo()
    assert_user_error(code, err, os.strerror(getattr(errno, code_name)))
    assert cache_files(cache) == [f"modules/{hashlib.sha256(first).hexdigest()}.wasm"]  # no orphan, no temp
    assert (cache / "index.json").read_bytes() == index_before
    assert pull_json(capsys, server.url("/second.wasm"), *_args(cache, server))["cache_hit"] is False
