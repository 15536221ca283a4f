"""One Wasm cache root for every command, and the host's compiled code in a private `compiled/` there
that `sidecar wasm gc` sweeps."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest

from sidecar.wasm import cache_root
from sidecar.wasm.fetch.cache import default_cache_dir
from sidecar.wasm.host import vm
from tests.support.wasm_fetch import ScriptedServer, pull_json, run
from tests.support.wat import ADD_HEADER

HOUR = 3600.0


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("SIDECAR_WASM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "sidecar" / "wasm"


@pytest.fixture(scope="module")
def module_bytes() -> bytes:
    import wasmtime

    return bytes(wasmtime.wat2wasm(ADD_HEADER))


def _run(capsys: pytest.CaptureFixture[str], module: str, *extra: str) -> None:
    code, out, err = run(capsys, "wasm", "run", module, "--json", *extra)
    assert code == 0, err
    assert dict(json.loads(out)["upstream_request"]["headers"])["x-wasm"] == "pulled"


def test_every_command_uses_one_root(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_root() == default_cache_dir() == root
    assert vm.cache_dir() == root / "compiled"
    monkeypatch.setenv("SIDECAR_WASM_CACHE", str(root.parent / "elsewhere"))
    assert default_cache_dir() == root.parent / "elsewhere"
    assert vm.cache_dir() == root.parent / "elsewhere" / "compiled"
    # `sidecar up -f` asks the translator's fetch for the default cache, not one of its own.
    import sidecar.stack.files as files

    seen: list[object] = []

    def fetch_module(code: object, cache_dir: object, **_: object) -> dict[str, object]:
        seen.append(cache_dir)
        return {}

    monkeypatch.setattr(files, "fetch_module", fetch_module)
    files.Stack(files.StackOptions(files=()), root.parent)._fetch({}, {})
    assert seen == [None]


def test_pulled_then_run_module_compiles_into_a_private_directory(
    root: Path, scripted_server: ScriptedServer, module_bytes: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted_server.routes["/filter.wasm"] = [(200, {}, module_bytes)]
    url = scripted_server.url("/filter.wasm")
    pulled = pull_json(capsys, url)
    assert Path(pulled["path"]).parent == root / "modules"
    _run(capsys, url)
    compiled = root / "compiled"
    assert stat.S_IMODE(compiled.stat().st_mode) == 0o700
    engine = [p.name for p in compiled.iterdir()]
    assert len(engine) == 1 and engine[0].startswith(hashlib.sha256(module_bytes).hexdigest() + "-")
    assert [p.name for p in root.iterdir() if p.suffix == ".cwasm"] == []  # none beside the modules


def test_an_existing_open_compiled_directory_is_made_private(
    root: Path, tmp_path: Path, module_bytes: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    (root / "compiled").mkdir(parents=True)
    os.chmod(root / "compiled", 0o777)
    module = tmp_path / "filter.wasm"
    module.write_bytes(module_bytes)
    _run(capsys, str(module))
    assert stat.S_IMODE((root / "compiled").stat().st_mode) == 0o700
    assert len(list((root / "compiled").iterdir())) == 1


def test_a_compiled_directory_that_is_a_symlink_is_not_used(
    root: Path, tmp_path: Path, module_bytes: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "planted"
    elsewhere.mkdir()
    root.mkdir(parents=True)
    (root / "compiled").symlink_to(elsewhere)
    module = tmp_path / "filter.wasm"
    module.write_bytes(module_bytes)
    _run(capsys, str(module))  # still runs, compiled uncached
    assert list(elsewhere.iterdir()) == []


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_gc_sweeps_compiled_code(
    root: Path,
    scripted_server: ScriptedServer,
    module_bytes: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scripted_server.routes["/filter.wasm"] = [(200, {}, module_bytes)]
    url = scripted_server.url("/filter.wasm")
    pull_json(capsys, url)
    _run(capsys, url)
    compiled = root / "compiled"
    [kept] = list(compiled.iterdir())
    _age(kept, 2 * HOUR)  # old, but its module is cached
    orphan_old = compiled / f"{'a' * 64}-{'0' * 16}.cwasm"
    orphan_new = compiled / f"{'b' * 64}-{'0' * 16}.cwasm"
    crashed = compiled / f"{'c' * 64}-{'0' * 16}.1234.tmp"
    legacy = compiled / f"{'d' * 64}.cwasm"  # the old naming: unknown, swept once stale
    for path in (orphan_old, orphan_new, crashed, legacy):
        path.write_bytes(b"x" * 10)
    for path in (orphan_old, crashed, legacy):
        _age(path, 2 * HOUR)
    link = compiled / f"{'e' * 64}-{'0' * 16}.cwasm"
    link.symlink_to(tmp_path / "victim")
    (tmp_path / "victim").write_bytes(b"keep me")

    code, out, err = run(capsys, "wasm", "gc", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["removed_compiled"], result["removed_compiled_bytes"]) == (4, 30)
    assert sorted(p.name for p in compiled.iterdir()) == sorted([kept.name, orphan_new.name])
    assert (tmp_path / "victim").read_bytes() == b"keep me"  # a link is removed, never followed

    code, out, err = run(capsys, "wasm", "gc", "--json", "--max-age", "60")
    assert code == 0, err
    assert json.loads(out)["removed_compiled"] == 1  # the cached module's code, unused for two hours
    assert [p.name for p in compiled.iterdir()] == [orphan_new.name]
    code, out, err = run(capsys, "wasm", "gc")
    assert code == 0 and "compiled artifacts" in out
