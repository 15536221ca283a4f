"""What counts as a module: the Wasm checks beyond the magic bytes (with and without wasmtime), and
which tar members of a compat layer count as plugin.wasm."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

from sidecar.wasm.fetch import binary
from sidecar.wasm.fetch.errors import NotWasmError
from tests.support import wat
from tests.support.wasm_fetch import (
    ScriptedServer,
    assert_user_error,
    cache_files,
    make_module,
    pull_json,
    run,
    serve_image,
)

HEADER = b"\0asm\x01\x00\x00\x00"

# Each is refused by the structural check alone (no wasmtime needed).
MALFORMED: dict[str, bytes] = {
    "magic-only": b"\0asm",
    "magic-and-half-a-version": b"\0asm\x01\x00",
    "version-2": b"\0asm\x02\x00\x00\x00",
    "a-component": b"\0asm\x0d\x00\x01\x00",
    "section-past-the-end": HEADER + b"\x01\x10\x00",
    "size-leb-unterminated": HEADER + b"\x01\xff\xff\xff\xff\xff",
    "unknown-section-id": HEADER + b"\x2a\x00",
    "sections-out-of-order": HEADER + b"\x03\x01\x00" + b"\x01\x01\x00",
    "section-repeated": HEADER + b"\x01\x01\x00" + b"\x01\x01\x00",
    "custom-name-past-section": HEADER + b"\x00\x02\x10a",
    "html": b"<html><body>login</body></html>",
    "truncated-module": make_module(200)[:-20],
}
# Frames that look right, contents wasmtime rejects.
INVALID_BODIES: dict[str, bytes] = {
    "function-without-type": HEADER + b"\x03\x02\x01\x05",  # one function of type 5, no type section
    "code-without-function": HEADER + b"\x0a\x04\x01\x02\x00\x0b",
    "bad-opcode": HEADER + b"\x01\x04\x01\x60\x00\x00" + b"\x03\x02\x01\x00" + b"\x0a\x05\x01\x03\x00\xff\x0b",
}


@pytest.mark.parametrize("name", MALFORMED)
def test_structure_check_refuses(name: str) -> None:
    assert binary.structure_problem(MALFORMED[name]) is not None


def test_structure_check_accepts_real_modules() -> None:
    assert binary.structure_problem(HEADER) is None
    assert binary.structure_problem(make_module(5000)) is None
    wasmtime = pytest.importorskip("wasmtime")
    # A proxy-wasm-shaped module: imports, memory, globals, exports, code, data, custom sections.
    text = wat.module(
        '(data (i32.const 1024) "hello")' + wat.headers_callback("i32.const 0"),
        imports='(import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))',
    )
    assert binary.structure_problem(wasmtime.wat2wasm(text)) is None


@pytest.mark.parametrize("name", [*MALFORMED, *INVALID_BODIES])
def test_invalid_modules_are_never_cached(
    name: str, scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {**MALFORMED, **INVALID_BODIES}[name]
    scripted_server.routes["/m.wasm"] = [(200, {}, data)]
    serve_image(scripted_server, "bad/mod", data)
    args = ("--cache-dir", str(tmp_path), "--insecure-registry", scripted_server.host)
    for ref in (scripted_server.url("/m.wasm"), f"{scripted_server.host}/bad/mod:v1"):
        code, _, err = run(capsys, "wasm", "pull", ref, *args)
        assert_user_error(code, err, "not a")  # "not a WebAssembly module" / "not a valid WebAssembly module"
    assert cache_files(tmp_path) == []


@pytest.mark.skipif(importlib.util.find_spec("wasmtime") is None, reason="needs the wasm extra")
@pytest.mark.parametrize("name", INVALID_BODIES)
def test_wasmtime_catches_what_the_structure_check_cannot(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.wasm"
    path.write_bytes(INVALID_BODIES[name])
    with pytest.raises(NotWasmError, match="not a valid WebAssembly module"):
        binary.check_module(path, "test")
    # Without wasmtime (the extra not installed) the structural check stands alone, and lets it through.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    binary.check_module(path, "test")


def _layer(*members: tuple[str, bytes | None, bytes]) -> bytes:
    """A tar+gzip of (name, data or None for a symlink, type) members."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if data is None:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


MODULE = make_module(300, seed="tar")
OTHER = make_module(300, seed="tar-other")
REG, SYM, HARD, DIR = tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE

TAR_CASES: dict[str, tuple[list[tuple[str, bytes | None, bytes]], str | None]] = {
    "plain": ([("plugin.wasm", MODULE, REG)], None),
    "dot-slash": ([("./plugin.wasm", MODULE, REG)], None),
    "with-other-files": ([("README", b"hi", REG), ("x/plugin.wasm", OTHER, REG), ("plugin.wasm", MODULE, REG)], None),
    "absolute": ([("/plugin.wasm", MODULE, REG)], "absolutely or indirectly"),
    "double-slash": ([("//plugin.wasm", MODULE, REG)], "absolutely or indirectly"),
    "dot-dot-back": ([("a/../plugin.wasm", MODULE, REG)], "absolutely or indirectly"),
    "dot-slash-dot": ([("././plugin.wasm", MODULE, REG)], "absolutely or indirectly"),
    "twice": ([("plugin.wasm", MODULE, REG), ("./plugin.wasm", OTHER, REG)], "more than once"),
    "symlink": ([("plugin.wasm", None, SYM)], "not a regular file"),
    "hardlink": ([("plugin.wasm", None, HARD)], "not a regular file"),
    "directory": ([("plugin.wasm", b"", DIR)], "not a regular file"),
    "only-nested": ([("x/plugin.wasm", MODULE, REG)], "holds no plugin.wasm"),
    "parent": ([("../plugin.wasm", MODULE, REG)], "holds no plugin.wasm"),
}


@pytest.mark.parametrize("name", TAR_CASES)
def test_compat_layer_member_names(
    name: str, scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    members, refusal = TAR_CASES[name]
    serve_image(scripted_server, "tar/mod", _layer(*members), media_type="application/vnd.oci.image.layer.v1.tar+gzip")
    args = ("--cache-dir", str(tmp_path), "--insecure-registry", scripted_server.host)
    if refusal is None:
        doc = pull_json(capsys, f"{scripted_server.host}/tar/mod:v1", *args)
        assert doc["sha256"] == hashlib.sha256(MODULE).hexdigest()
        return
    code, _, err = run(capsys, "wasm", "pull", f"{scripted_server.host}/tar/mod:v1", *args)
    assert_user_error(code, err, refusal)
    assert cache_files(tmp_path) == []
    assert not Path("/plugin.wasm").exists()


def test_layer_that_inflates_past_the_bound(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Huge members that are skipped still have to be inflated: bounded by twice the module cap."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        filler = bytes(3 << 20)
        info = tarfile.TarInfo("filler")
        info.size = len(filler)
        tar.addfile(info, io.BytesIO(filler))
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(MODULE)
        tar.addfile(info, io.BytesIO(MODULE))
    layer = gzip.compress(raw.getvalue())
    serve_image(scripted_server, "tar/bomb", layer, media_type="application/vnd.oci.image.layer.v1.tar+gzip")
    args = ("--cache-dir", str(tmp_path), "--insecure-registry", scripted_server.host, "--max-size", "500000")
    code, _, err = run(capsys, "wasm", "pull", f"{scripted_server.host}/tar/bomb:v1", *args)
    assert_user_error(code, err, "inflates to more than")
    assert cache_files(tmp_path) == []
