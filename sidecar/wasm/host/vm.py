"""Loading modules into wasmtime under limits, with an on-disk cache of compiled code.

One Engine per stack limit (wasmtime bakes `max_wasm_stack` into the engine). Epoch interruption
bounds every call: a single daemon thread bumps the epoch of every engine every `_TICK_S`, and each
call sets its deadline in ticks, so no thread is started per call.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from sidecar.wasm import COMPILED_DIR, cache_root
from sidecar.wasm.host.errors import WasmLoadError

__all__ = ["Limits", "cache_dir", "compile_module", "engine_for", "read_module_bytes", "ticks_for"]

log = logging.getLogger("sidecar.wasm")

_TICK_S = 0.005
#: Compiled code read back from the cache; a larger file is not loaded (modules are at most 256 MiB).
MAX_ARTIFACT_BYTES = 1 << 30
_WASM_MAGIC = b"\0asm"
_WASMTIME_VERSION = importlib.metadata.version("wasmtime")


@dataclass(frozen=True)
class Limits:
    """Bounds for one VM. Defaults suit test suites; tighten them for untrusted modules.

    `host_state_bytes` bounds what the guest makes the *host* keep outside the guest's own memory: log
    records, shared data, queues, properties, metrics, header maps and bodies it sets, local replies and
    pending callouts (docs/wasm-host.md lists every charge).
    """

    call_timeout_s: float = 5.0
    memory_bytes: int = 512 << 20
    max_stack_bytes: int = 1 << 20
    host_state_bytes: int = 32 << 20


_engines: dict[int, wasmtime.Engine] = {}
_engines_lock = threading.Lock()
_ticker: threading.Thread | None = None


def _tick_forever() -> None:
    while True:
        time.sleep(_TICK_S)
        for engine in list(_engines.values()):
            engine.increment_epoch()


def engine_for(limits: Limits) -> wasmtime.Engine:
    global _ticker
    with _engines_lock:
        engine = _engines.get(limits.max_stack_bytes)
        if engine is None:
            config = wasmtime.Config()
            config.epoch_interruption = True
            config.max_wasm_stack = limits.max_stack_bytes
            engine = _engines[limits.max_stack_bytes] = wasmtime.Engine(config)
        if _ticker is None:
            _ticker = threading.Thread(target=_tick_forever, name="wasm-host-epoch", daemon=True)
            _ticker.start()
        return engine


def ticks_for(seconds: float) -> int:
    return max(1, int(seconds / _TICK_S) + 1)


def cache_dir() -> Path:
    """The compiled-code cache: `compiled/` under the Wasm cache root the fetcher uses too (0700)."""
    return cache_root() / COMPILED_DIR


def read_module_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WasmLoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise WasmLoadError(f"{path}: is a directory, not a Wasm module") from None
    except OSError as exc:
        raise WasmLoadError(f"{path}: cannot read: {exc.strerror}") from None
    if data.startswith(_WASM_MAGIC) or path.suffix == ".wat":
        return data
    raise WasmLoadError(f"{path}: not a WebAssembly module (no \\0asm magic)")


def compile_module(engine: wasmtime.Engine, data: bytes | str, name: str, *, cache: Path | None) -> wasmtime.Module:
    """Compile `data` (binary or WAT), reusing a serialized artifact from `cache` when present.

    wasmtime trusts what it deserializes, so the cache directory is created private (0700) and
    artifacts are written atomically; never point `cache` at a directory others can write.
    """
    raw = data.encode() if isinstance(data, str) else data
    # <module sha256>-<engine>.cwasm: `sidecar wasm gc` keeps the code of modules still in the cache.
    engine_key = hashlib.sha256(_engine_fingerprint(engine)).hexdigest()[:16]
    usable = cache is not None and _private_dir(cache)
    path = cache / f"{hashlib.sha256(raw).hexdigest()}-{engine_key}.cwasm" if usable and cache else None
    artifact = _read_own_artifact(path) if path is not None else None
    if path is not None and artifact is not None:
        try:
            module = wasmtime.Module.deserialize(engine, artifact)
        except wasmtime.WasmtimeError:
            path.unlink(missing_ok=True)  # stale artifact from another wasmtime build
        else:
            with contextlib.suppress(OSError):
                os.utime(path)  # last use, for `sidecar wasm gc --max-age`
            return module
    try:
        module = wasmtime.Module(engine, raw if raw.startswith(_WASM_MAGIC) else raw.decode(errors="replace"))
    except wasmtime.WasmtimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid module"
        raise WasmLoadError(f"{name}: cannot compile: {first}") from None
    if path is not None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(module.serialize())
        os.replace(tmp, path)
    return module


def _read_own_artifact(path: Path) -> bytes | None:
    """The compiled code at `path` if this user alone could have written it; None otherwise (and a
    file that fails the check is deleted, so it is compiled afresh). wasmtime runs deserialized code
    as it is: a file planted by someone else, or reached through a symlink, is never loaded."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:  # a symlink (ELOOP), or unreadable
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    with os.fdopen(fd, "rb") as artifact:
        st = os.fstat(artifact.fileno())
        trusted = stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
        if trusted and st.st_size <= MAX_ARTIFACT_BYTES:
            return artifact.read(MAX_ARTIFACT_BYTES + 1)[:MAX_ARTIFACT_BYTES]
    log.warning("compiled-code cache: %s is not a private file of this user; compiling afresh", path)
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def _private_dir(directory: Path) -> bool:
    """Create `directory` 0700, or make an existing one of ours 0700. wasmtime runs what it deserializes,
    so a directory another user owns (or a symlink) is not used at all: compilation runs uncached."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return False
        if st.st_mode & 0o077:
            os.chmod(directory, 0o700)
        return True
    except OSError:
        return False


def _engine_fingerprint(engine: wasmtime.Engine) -> bytes:
    # Serialized code is only valid for the same wasmtime build and engine settings.
    stack = next((k for k, v in _engines.items() if v is engine), 0)
    return f"|wasmtime-{_WASMTIME_VERSION}|stack={stack}".encode()
