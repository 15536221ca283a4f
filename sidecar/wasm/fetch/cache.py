"""A content-addressed Wasm module cache shared by processes (sidecar, init container, CLI).

Layout under the root:

    modules/<sha256>.wasm   the modules, named by their own sha256 (what Envoy is told)
    tmp/                    downloads in progress (same filesystem, so publishing is a rename)
    index.json              source keys -> module, plus per-module size and last use
    index.lock, locks/      flock files: one for the index, one per source being fetched

Writers take `index.lock` for the read-modify-write of `index.json` and replace it atomically, so a
reader never sees half an index and a crash never leaves half a module under `modules/`. A size cap
evicts least-recently-used modules (EG only refuses new ones); `gc` drops unreferenced files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client import Gauge

from sidecar.wasm.fetch.errors import CacheError, TooLargeError, UnavailableError

__all__ = ["DEFAULT_MAX_CACHE_BYTES", "ENV_CACHE_DIR", "CachedModule", "GcResult", "ModuleCache", "default_cache_dir"]

DEFAULT_MAX_CACHE_BYTES = 1 << 30  # EG's MaxCacheSize
_TOUCH_INTERVAL = 60.0  # hits rewrite the index at most this often per module
_STALE_TMP_SECONDS = 3600.0
_LOCK_POLL = 0.05
# Named as Envoy Gateway's (internal/wasm/metrics.go), so EG dashboards work unchanged.
CACHE_ENTRIES = Gauge("wasm_cache_entries", "Number of Wasm modules in the cache.")
ENV_CACHE_DIR = "SIDECAR_WASM_CACHE"


def default_cache_dir() -> Path:
    """The cache root when none is given: `$SIDECAR_WASM_CACHE`, else `$XDG_CACHE_HOME/sidecar/wasm`
    (`~/.cache/sidecar/wasm`). The CLI and `sidecar render` use it."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sidecar" / "wasm"


@dataclass(frozen=True)
class CachedModule:
    """A module in the cache and the source it was fetched for."""

    sha256: str
    path: Path
    size: int
    digest: str  # the manifest digest of an image, the body sha256 of an HTTP URL
    source: str


@dataclass(frozen=True)
class GcResult:
    removed_modules: int
    removed_bytes: int
    removed_temp_files: int


class ModuleCache:
    """The cache at `root`; every method is safe against other processes using the same root."""

    def __init__(
        self,
        root: str | Path,
        *,
        max_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        file_mode: int = 0o644,
        dir_mode: int = 0o755,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._file_mode = file_mode
        self._modules = self.root / "modules"
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        self._index = self.root / "index.json"
        try:
            for directory in (self.root, self._tmp, self._locks):
                directory.mkdir(mode=dir_mode, parents=True, exist_ok=True)
            try:
                self._modules.mkdir(mode=dir_mode)
            except FileExistsError:
                pass  # a mounted volume, or another process created it first: keep the mode it has
            else:
                # The Envoy UID must read modules/; mkdir's mode is masked by the umask, chmod's is not.
                os.chmod(self._modules, dir_mode)
        except OSError as exc:
            raise CacheError(f"cache directory {self.root}: cannot create ({exc.strerror})") from None

    def path_for(self, sha256: str) -> Path:
        return self._modules / f"{sha256}.wasm"

    # --- locking ---

    @contextlib.contextmanager
    def _flock(self, path: Path, deadline: float | None, what: str) -> Iterator[None]:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CacheError(f"cache lock {path}: cannot open ({exc.strerror})") from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                    break
                except BlockingIOError:
                    assert deadline is not None
                    if time.monotonic() >= deadline:
                        raise UnavailableError(f"{what}: another process is still fetching it") from None
                    time.sleep(_LOCK_POLL)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def fetch_lock(self, source_key: str, deadline: float) -> contextlib.AbstractContextManager[None]:
        """Held while fetching one source, so concurrent pulls of it download once."""
        name = hashlib.sha256(source_key.encode()).hexdigest()[:32]
        return self._flock(self._locks / f"{name}.lock", deadline, source_key)

    def _index_lock(self) -> contextlib.AbstractContextManager[None]:
        # Held for milliseconds (one read-modify-write); blocking is fine.
        return self._flock(self.root / "index.lock", None, str(self._index))

    # --- the index ---

    def _read_index(self) -> dict[str, Any]:
        try:
            raw = self._index.read_bytes()
        except FileNotFoundError:
            return {"version": 1, "modules": {}, "refs": {}}
        except OSError as exc:
            raise CacheError(f"cache index {self._index}: cannot read ({exc.strerror})") from None
        try:
            index = json.loads(raw)
        except ValueError:
            raise CacheError(f"cache index {self._index}: not valid JSON; delete it and pull again") from None
        if not isinstance(index, dict) or index.get("version") != 1:
            raise CacheError(f"cache index {self._index}: unknown format; delete it and pull again")
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        CACHE_ENTRIES.set(len(index["modules"]))
        data = json.dumps(index, sort_keys=True, indent=1).encode()
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="index.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self._index)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _module(self, index: dict[str, Any], ref: dict[str, Any]) -> CachedModule | None:
        sha = ref["module"]
        info = index["modules"].get(sha)
        path = self.path_for(sha)
        if info is None or not path.is_file():
            return None
        return CachedModule(sha, path, int(info["size"]), str(ref["digest"]), str(ref["source"]))

    # --- public operations ---

    def lookup(self, keys: Sequence[str]) -> CachedModule | None:
        """The module that every one of `keys` points at, or None if any is missing or they disagree
        (a tag and a pinned sha256 must name the same module to count as a hit)."""
        if not keys:
            return None
        index = self._read_index()
        refs = [index["refs"].get(key) for key in keys]
        if any(ref is None for ref in refs) or len({ref["module"] for ref in refs if ref}) != 1:
            return None
        assert refs[0] is not None
        found = self._module(index, refs[0])
        if found is not None:
            last_used = float(index["modules"][found.sha256]["last_used"])
            if time.time() - last_used > _TOUCH_INTERVAL:
                self._touch(found.sha256)
        return found

    def _touch(self, sha256: str) -> None:
        """Record a use for LRU eviction; best effort, so a read-only cache still serves hits."""
        with contextlib.suppress(OSError, CacheError), self._index_lock():
            index = self._read_index()
            if sha256 in index["modules"]:
                index["modules"][sha256]["last_used"] = time.time()
                self._write_index(index)

    @contextlib.contextmanager
    def temp_file(self) -> Iterator[tuple[Path, IO[bytes]]]:
        """A scratch file in the cache's filesystem; removed on exit whatever happens."""
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="fetch.")
        path = Path(name)
        try:
            with os.fdopen(fd, "w+b") as handle:
                yield path, handle
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def store(self, temp: Path, sha256: str, size: int, keys: Sequence[str], digest: str, source: str) -> CachedModule:
        """Publish a verified module file (renamed, not copied) and point `keys` at it."""
        if size > self.max_bytes:
            raise TooLargeError(f"{source}: module is {size} bytes, more than the cache cap of {self.max_bytes}")
        final = self.path_for(sha256)
        try:
            os.chmod(temp, self._file_mode)
            with self._index_lock():
                index = self._read_index()
                os.replace(temp, final)  # same bytes if another process got here first
                now = time.time()
                index["modules"][sha256] = {"size": size, "last_used": now}
                for key in keys:
                    index["refs"][key] = {
                        "module": sha256,
                        "digest": digest,
                        "source": source,
                        "fetched": now,
                    }
                self._evict(index, keep=sha256)
                self._write_index(index)
        except OSError as exc:
            raise CacheError(f"cache directory {self.root}: cannot store module ({exc.strerror})") from None
        return CachedModule(sha256, final, size, digest, source)

    def _evict(self, index: dict[str, Any], keep: str) -> None:
        """Least-recently-used eviction until the total fits; runs under the index lock."""
        modules: dict[str, Any] = index["modules"]
        total = sum(int(info["size"]) for info in modules.values())
        by_age = sorted((float(info["last_used"]), sha) for sha, info in modules.items() if sha != keep)
        for _, sha in by_age:
            if total <= self.max_bytes:
                break
            total -= int(modules[sha]["size"])
            self._drop(index, sha)
            with contextlib.suppress(FileNotFoundError):
                self.path_for(sha).unlink()

    def _drop(self, index: dict[str, Any], sha: str) -> None:
        """Forget a module; its file goes at once on eviction, or in `gc`'s sweep."""
        index["modules"].pop(sha, None)
        index["refs"] = {k: v for k, v in index["refs"].items() if v["module"] != sha}

    def store_keys(self, module: CachedModule, keys: Sequence[str]) -> CachedModule:
        """Point more keys at a module already cached (a tag re-resolved to a known digest)."""
        with self._index_lock():
            index = self._read_index()
            if module.sha256 not in index["modules"]:
                raise CacheError(f"cache index {self._index}: module {module.sha256} vanished during the pull")
            now = time.time()
            index["modules"][module.sha256]["last_used"] = now
            for key in keys:
                index["refs"][key] = {
                    "module": module.sha256,
                    "digest": module.digest,
                    "source": module.source,
                    "fetched": now,
                }
            self._write_index(index)
        return module

    def entries(self) -> list[tuple[str, CachedModule]]:
        """(source key, module) for every index entry whose module is on disk."""
        index = self._read_index()
        found = []
        for key, ref in sorted(index["refs"].items()):
            module = self._module(index, ref)
            if module is not None:
                found.append((key, module))
        return found

    def gc(self, max_age: float | None = None) -> GcResult:
        """Drop modules not used for `max_age` seconds, module files no entry refers to, entries whose
        file is gone, and temp files of crashed fetches."""
        removed = removed_bytes = temps = 0
        now = time.time()
        with self._index_lock():
            index = self._read_index()
            referenced = {ref["module"] for ref in index["refs"].values()}
            for sha, info in list(index["modules"].items()):
                old = max_age is not None and now - float(info["last_used"]) > max_age
                if old or sha not in referenced:
                    self._drop(index, sha)
            for path in self._modules.iterdir():
                if path.name.removesuffix(".wasm") not in index["modules"]:
                    removed += 1
                    removed_bytes += path.stat().st_size
                    path.unlink()
            for sha in [sha for sha in index["modules"] if not self.path_for(sha).is_file()]:
                self._drop(index, sha)
            for path in self._tmp.iterdir():
                if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                    temps += 1
                    path.unlink()
            self._write_index(index)
        return GcResult(removed, removed_bytes, temps)
