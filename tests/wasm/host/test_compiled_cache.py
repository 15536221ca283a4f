"""The compiled-code cache loads only what this user wrote: wasmtime runs deserialized native code as it is,
so a planted artifact (someone else's, writable by others, or a symlink) is deleted and compiled afresh."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.wasm.host.vm import Limits, compile_module, engine_for

MINE = '(module (func (export "mine")))'
PLANTED = '(module (func (export "planted")))'


def _exports(module: object) -> list[str]:
    return [export.name for export in module.exports]  # type: ignore[attr-defined]


def _planted_code() -> bytes:
    return bytes(compile_module(engine_for(Limits()), PLANTED, "planted", cache=None).serialize())


def _plant(cache: Path, how: Callable[[Path], None]) -> Path:
    """Cache MINE's code, then put PLANTED's compiled code where MINE's artifact is, placed by `how`."""
    compile_module(engine_for(Limits()), MINE, "mine", cache=cache)
    (artifact,) = cache.glob("*.cwasm")
    artifact.unlink()
    how(artifact)
    return artifact


def _writable_by_others(artifact: Path) -> None:
    artifact.write_bytes(_planted_code())
    artifact.chmod(0o666)


def _group_writable(artifact: Path) -> None:
    artifact.write_bytes(_planted_code())
    artifact.chmod(0o620)


def _symlink(artifact: Path) -> None:
    target = artifact.parent.parent / "elsewhere.cwasm"
    target.write_bytes(_planted_code())
    target.chmod(0o600)  # private, but reached through a link someone could have made
    artifact.symlink_to(target)


def _another_user(artifact: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("giving a file to another user needs root")
    artifact.write_bytes(_planted_code())
    artifact.chmod(0o600)
    os.chown(artifact, 12345, 12345)


@pytest.mark.parametrize("how", [_writable_by_others, _group_writable, _symlink, _another_user])
def test_a_planted_artifact_is_never_loaded(tmp_path: Path, how: Callable[[Path], None]) -> None:
    cache = tmp_path / "cache"
    artifact = _plant(cache, how)
    module = compile_module(engine_for(Limits()), MINE, "mine", cache=cache)
    assert _exports(module) == ["mine"]  # compiled afresh, not the planted code
    st = os.lstat(artifact)  # and the cache holds this user's private artifact again
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
    again = compile_module(engine_for(Limits()), MINE, "mine", cache=cache)
    assert _exports(again) == ["mine"]


def test_a_private_artifact_is_reused(tmp_path: Path) -> None:
    engine = engine_for(Limits())
    compile_module(engine, MINE, "mine", cache=tmp_path)
    (artifact,) = tmp_path.glob("*.cwasm")
    inode = artifact.stat().st_ino
    assert _exports(compile_module(engine, MINE, "mine", cache=tmp_path)) == ["mine"]
    assert artifact.stat().st_ino == inode  # loaded, not written again
