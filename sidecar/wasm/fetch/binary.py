"""Is a file a WebAssembly module? More than the `\\0asm` magic: four bytes of magic alone, or a
truncated download that happens to start right, must not be cached and handed to Envoy.

Two checks, in order:

* structure (always): magic, binary version 1 (a component is refused: Envoy loads core modules),
  then sections that each fit in the file, known section ids, non-custom sections at most once and in
  the order the spec gives;
* `wasmtime.Module.validate` when wasmtime is installed (the `wasm` extra): the full validation
  (types, instructions) without compiling. Without wasmtime the structural check stands alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sidecar.wasm.fetch.errors import NotWasmError
from sidecar.wasm.fetch.transfer import WASM_MAGIC

__all__ = ["check_module", "structure_problem"]

_VERSION_1 = b"\x01\x00\x00\x00"
# The order non-custom sections must come in (ids): type, import, function, table, memory, tag,
# global, export, start, element, data count, code, data.
_SECTION_ORDER = (1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11)
_MAX_MESSAGE = 160


def _leb_u32(data: bytes | memoryview, pos: int) -> tuple[int, int] | None:
    """An unsigned LEB128 of at most 5 bytes at `pos`: (value, next position), or None."""
    value = shift = 0
    for n in range(5):
        if pos + n >= len(data):
            return None
        byte = data[pos + n]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value, pos + n + 1) if value < 1 << 32 else None
        shift += 7
    return None


def structure_problem(data: bytes | memoryview) -> str | None:
    """What is wrong with the binary's frame, or None if the frame is sound."""
    if bytes(data[:4]) != WASM_MAGIC:
        return f"starts with {bytes(data[:4])!r}, expected b'\\x00asm'"
    if len(data) < 8:
        return f"{len(data)} bytes, shorter than the 8-byte header"
    version = bytes(data[4:8])
    if version != _VERSION_1:
        return f"binary version {version.hex()} is not 01000000 (a component or another format, not a core module)"
    pos, last = 8, -1
    while pos < len(data):
        section_id = data[pos]
        size = _leb_u32(data, pos + 1)
        if size is None:
            return f"section at offset {pos} has a malformed size"
        length, body = size
        if body + length > len(data):
            return f"section {section_id} at offset {pos} claims {length} bytes, past the end of the file"
        if section_id != 0:
            if section_id not in _SECTION_ORDER:
                return f"unknown section id {section_id} at offset {pos}"
            rank = _SECTION_ORDER.index(section_id)
            if rank <= last:
                return f"section {section_id} at offset {pos} is repeated or out of order"
            last = rank
        else:
            name = _leb_u32(data, body)
            if name is None or name[1] + name[0] > body + length:
                return f"custom section at offset {pos} has a malformed name"
        pos = body + length
    return None


def check_module(path: Path, where: str) -> None:
    """Raise NotWasmError unless the file at `path` is a valid WebAssembly module."""
    data = path.read_bytes()
    problem = structure_problem(data)
    if problem is not None:
        raise NotWasmError(f"{where}: not a WebAssembly module ({problem})")
    if importlib.util.find_spec("wasmtime") is None:
        return
    import wasmtime  # the `wasm` extra; heavy, so only here

    try:
        wasmtime.Module.validate(wasmtime.Engine(), data)
    except wasmtime.WasmtimeError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise NotWasmError(f"{where}: not a valid WebAssembly module ({detail[:_MAX_MESSAGE]})") from None
