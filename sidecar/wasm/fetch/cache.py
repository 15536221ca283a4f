"""A content-addressed Wasm module cache shared by processes (sidecar, init container, CLI).

Layout under the root:

    modules/<sha256>.wasm   the modules, named by their own sha256 (what Envoy is told)
    tmp/                    downloads in progress (same filesystem, so publishing is a rename)
    index.json              source keys -> module, plus per-module size, last use and file stamp
    index.lock, locks/      flock files: one for the index, one per source being fetched

Writers take `index.lock` for the read-modify-write of `index.json` and replace it atomically, so a
reader never sees half an index and a crash never leaves half a module under `modules/`. A size cap
evicts least-recently-used modules (EG only refuses new ones); `gc` drops unreferenced files.

The cache does not trust its own disk. Every hand-out verifies the module: opened without following
a symlink, a regular file of the recorded size, and either the same file as when it was last hashed
(device, inode, size, mtime and ctime all equal: a write or a rename changes ctime, and ctime cannot
be set back) or hashed again. A module that fails is removed and reported as a miss, so the fetcher
downloads it again. An index that cannot be read as one is set aside (`index.json.corrupt`) and
rebuilt from the modules on disk; single misshapen entries are dropped. The cache writes only into
real directories under its root: `modules/`, `tmp/` or `locks/` as symlinks are refused, and files
are opened with O_NOFOLLOW. Every filesystem failure is one CacheError line, and a failed store
leaves neither a temp file nor an unindexed module behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client import Gauge

from sidecar.wasm import COMPILED_DIR, ENV_CACHE_DIR, cache_root
from sidecar.wasm.fetch.errors import CacheError, TooLargeError, UnavailableError

__all__ = [
    "DEFAULT_MAX_CACHE_BYTES",
    "ENV_CACHE_DIR",
    "CacheLookup",
    "CachedModule",
    "GcResult",
    "ModuleCache",
    "default_cache_dir",
]

DEFAULT_MAX_CACHE_BYTES = 1 << 30  # EG's MaxCacheSize
_MAX_INDEX_BYTES = 16 << 20  # ~100,000 entries; a larger index.json is treated as corrupt
_TOUCH_INTERVAL = 60.0  # hits rewrite the index at most this often per module
_STALE_TMP_SECONDS = 3600.0
_LOCK_POLL = 0.05
_HASH_CHUNK = 1 << 20
_MODULE_NAME = re.compile(r"([a-f0-9]{64})\.wasm")
_HEX64 = re.compile(r"[a-f0-9]{64}")
_COMPILED_NAME = re.compile(r"([a-f0-9]{64})-[a-f0-9]{16}\.cwasm")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO planted in the cache must not block us
# Named as Envoy Gateway's (internal/wasm/metrics.go), so EG dashboards work unchanged.
CACHE_ENTRIES = Gauge("wasm_cache_entries", "Number of Wasm modules in the cache.")
_log = logging.getLogger("sidecar.wasm.fetch")


def default_cache_dir() -> Path:
    """The cache root when none is given: `$SIDECAR_WASM_CACHE`, else `$XDG_CACHE_HOME/sidecar/wasm`
    (`~/.cache/sidecar/wasm`). The CLI, `sidecar render` and `sidecar up -f` use it."""
    return cache_root()


@dataclass(frozen=True)
class CachedModule:
    """A module in the cache and the source it was fetched for."""

    sha256: str
    path: Path
    size: int
    digest: str  # the manifest digest of an image, the body sha256 of an HTTP URL
    source: str  # the image reference or URL this entry was fetched for
    layout: str | None = None  # an image's layout ("oci" or "compat"); None for HTTP URLs


@dataclass(frozen=True)
class CacheLookup:
    """A verified module, or None; `evicted` says why a cached module was thrown away, if one was."""

    module: CachedModule | None
    evicted: str | None = None


@dataclass(frozen=True)
class GcResult:
    removed_modules: int
    removed_bytes: int
    removed_temp_files: int
    removed_corrupt: int = 0
    index_rebuilt: bool = False
    removed_compiled: int = 0  # wasmtime artifacts (`compiled/*.cwasm`) and leftovers there
    removed_compiled_bytes: int = 0


class _CorruptIndex(Exception):
    """index.json cannot be used as a whole; the message says why."""


def _errno_text(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


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
            self.root.mkdir(mode=dir_mode, parents=True, exist_ok=True)
            for directory in (self._tmp, self._locks):
                self._make_dir(directory, dir_mode)
            if self._make_dir(self._modules, dir_mode):
                # The Envoy UID must read modules/; mkdir's mode is masked by the umask, chmod's is not.
                os.chmod(self._modules, dir_mode)
        except OSError as exc:
            raise CacheError(f"cache directory {self.root}: cannot create ({_errno_text(exc)})") from None
        self._check_layout()

    @staticmethod
    def _make_dir(path: Path, mode: int) -> bool:
        """Create `path` if nothing is there (not even a dangling symlink); True if we created it."""
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            return False  # a mounted volume, or another process created it first: keep the mode it has
        return True

    def _check_layout(self) -> None:
        """Refuse to work through symlinked subdirectories: writes must stay under the root."""
        for directory in (self._modules, self._tmp, self._locks):
            try:
                mode = os.lstat(directory).st_mode
            except OSError as exc:
                raise CacheError(f"cache directory {directory}: cannot use ({_errno_text(exc)})") from None
            if stat.S_ISLNK(mode):
                raise CacheError(
                    f"cache directory {directory} is a symlink; the cache writes only to real directories "
                    "under its root (remove the link and the cache recreates the directory)"
                )
            if not stat.S_ISDIR(mode):
                raise CacheError(f"cache directory {directory} is not a directory; remove it")

    def path_for(self, sha256: str) -> Path:
        return self._modules / f"{sha256}.wasm"

    # --- locking ---

    def _open_lock(self, path: Path) -> int:
        """A lock file opened without following symlinks; a planted link is removed, not followed."""
        for _ in range(2):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)  # removes the link itself, never its target
                    _log.warning("cache lock %s was a symlink; replaced it with a lock file", path)
                    continue
                raise CacheError(f"cache lock {path}: cannot open ({_errno_text(exc)})") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise CacheError(f"cache lock {path} is not a regular file; remove it")
            return fd
        raise CacheError(f"cache lock {path}: keeps turning into a symlink; refusing to use it")

    @contextlib.contextmanager
    def _flock(self, path: Path, deadline: float | None, what: str) -> Iterator[None]:
        fd = self._open_lock(path)
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
        # Held for milliseconds (one read-modify-write), or a rebuild; blocking is fine.
        return self._flock(self.root / "index.lock", None, str(self._index))

    # --- the index ---

    def _read_index(self) -> dict[str, Any]:
        """The index as on disk, with misshapen entries dropped; _CorruptIndex if it is not one."""
        try:
            fd = os.open(self._index, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            return {"version": 1, "modules": {}, "refs": {}}
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _CorruptIndex("is a symlink") from None
            raise CacheError(f"cache index {self._index}: cannot read ({_errno_text(exc)})") from None
        try:
            with os.fdopen(fd, "rb") as handle:
                st = os.fstat(handle.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise _CorruptIndex("is not a regular file")
                if st.st_size > _MAX_INDEX_BYTES:
                    raise _CorruptIndex(f"is larger than {_MAX_INDEX_BYTES} bytes")
                # Sized by fstat (a read(cap) would allocate the whole cap on every hit); the index is
                # replaced by rename, never grown in place, and the check below still holds the cap.
                raw = handle.read(st.st_size + 1)
        except OSError as exc:
            raise CacheError(f"cache index {self._index}: cannot read ({_errno_text(exc)})") from None
        if len(raw) > _MAX_INDEX_BYTES:
            raise _CorruptIndex(f"is larger than {_MAX_INDEX_BYTES} bytes")
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):
            raise _CorruptIndex("is not valid JSON") from None
        return _validated(document)

    def _load(self, locked: bool) -> dict[str, Any]:
        """The index; a corrupt one is set aside and rebuilt (under the index lock) first."""
        try:
            return self._read_index()
        except _CorruptIndex as bad:
            if locked:
                return self._rebuild(str(bad))
        with self._index_lock():
            try:
                return self._read_index()  # another process may have rebuilt it meanwhile
            except _CorruptIndex as bad:
                return self._rebuild(str(bad))

    def _rebuild(self, why: str) -> dict[str, Any]:
        """Set the index aside and rebuild it from the modules that still hash to their names.
        Source keys are lost, so each source is fetched once more (its module file is kept)."""
        aside = self.root / "index.json.corrupt"
        try:
            os.replace(self._index, aside)  # a symlink is moved, not followed
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CacheError(f"cache index {self._index} {why} and cannot be set aside ({_errno_text(exc)})") from None
        index: dict[str, Any] = {"version": 1, "modules": {}, "refs": {}}
        for path in self._module_files():
            verdict = self._check_file(path.name.removesuffix(".wasm"), None, full=True)
            if verdict.stamp is None:
                self._remove(path)
                continue
            index["modules"][path.name.removesuffix(".wasm")] = {
                "size": verdict.stamp[2],
                "last_used": time.time(),
                "stamp": verdict.stamp,
            }
        self._write_index(index)
        _log.warning(
            "cache index %s %s; set aside as %s and rebuilt from %d modules on disk",
            self._index,
            why,
            aside,
            len(index["modules"]),
        )
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        CACHE_ENTRIES.set(len(index["modules"]))
        data = json.dumps(index, sort_keys=True, indent=1).encode()
        try:
            fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="index.")
        except OSError as exc:
            raise CacheError(f"cache index {self._index}: cannot write ({_errno_text(exc)})") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self._index)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise CacheError(f"cache index {self._index}: cannot write ({_errno_text(exc)})") from None

    # --- verification ---

    def _check_file(self, sha: str, info: dict[str, Any] | None, *, full: bool = False) -> _Verdict:
        """Is modules/<sha>.wasm the module `info` describes? `full` re-hashes even an unchanged file."""
        path = self.path_for(sha)
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            return _Verdict(None, "is missing")
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return _Verdict(None, "is a symlink")
            raise CacheError(f"cached module {path}: cannot read ({_errno_text(exc)})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return _Verdict(None, "is not a regular file")
            expected_size = info["size"] if info is not None else st.st_size
            if st.st_size != expected_size:
                return _Verdict(None, f"has {st.st_size} bytes, the index says {expected_size}")
            if st.st_size > self.max_bytes:
                return _Verdict(None, f"has {st.st_size} bytes, more than the cache cap")
            stamp = _stamp(st)
            if not full and info is not None and info.get("stamp") == stamp:
                return _Verdict(stamp, None, rehashed=False)
            digest = hashlib.sha256()
            while chunk := os.read(fd, _HASH_CHUNK):
                digest.update(chunk)
            if digest.hexdigest() != sha:
                return _Verdict(None, f"has changed (its content hashes to sha256:{digest.hexdigest()})")
            return _Verdict(stamp, None, rehashed=True)
        except OSError as exc:
            raise CacheError(f"cached module {path}: cannot read ({_errno_text(exc)})") from None
        finally:
            os.close(fd)

    def _remove(self, path: Path) -> None:
        """Unlink a module file or link (never through a link); an empty directory is removed too, a
        full one is left (and a module can then not be stored there: one CacheError line)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def _evict_bad(self, sha: str, reason: str) -> str:
        """Remove a module that failed verification, unless another process fixed it meanwhile."""
        text = f"cached module sha256:{sha} {reason}"
        try:
            with self._index_lock():
                index = self._load(True)
                info = index["modules"].get(sha)
                if info is not None and self._check_file(sha, info, full=True).stamp is not None:
                    return ""  # re-fetched by another process while we looked
                self._remove(self.path_for(sha))
                self._drop(index, sha)
                self._write_index(index)
        except (CacheError, OSError) as exc:
            detail = str(exc) if isinstance(exc, CacheError) else _errno_text(exc)
            raise CacheError(f"{text}; refusing it, and it cannot be removed: {detail}") from None
        _log.warning("%s; removed it", text)
        return f"{text}; it was removed"

    # --- public operations ---

    def find(self, keys: Sequence[str]) -> CacheLookup:
        """The verified module that every one of `keys` points at. A miss if any key is missing or
        they disagree (a tag and a pinned sha256 must name the same module), or if the module failed
        verification (then `evicted` says why and it is gone from the cache)."""
        if not keys:
            return CacheLookup(None)
        for _ in range(2):  # once more if another process replaced a bad module while we looked
            index = self._load(False)
            refs = [index["refs"].get(key) for key in keys]
            if any(ref is None for ref in refs) or len({ref["module"] for ref in refs if ref}) != 1:
                return CacheLookup(None)
            ref = refs[0]
            assert ref is not None
            sha = ref["module"]
            info = index["modules"][sha]
            verdict = self._check_file(sha, info)
            if verdict.stamp is not None:
                break
            assert verdict.problem is not None
            evicted = self._evict_bad(sha, verdict.problem)
            if evicted:
                return CacheLookup(None, evicted)
        else:
            return CacheLookup(None)
        assert verdict.stamp is not None
        if verdict.rehashed or time.time() - float(info["last_used"]) > _TOUCH_INTERVAL:
            self._touch(sha, verdict.stamp)
        module = _module(sha, self.path_for(sha), int(info["size"]), ref)
        return CacheLookup(module)

    def lookup(self, keys: Sequence[str]) -> CachedModule | None:
        """`find(keys).module`."""
        return self.find(keys).module

    def _touch(self, sha256: str, stamp: list[int]) -> None:
        """Record a use (for LRU eviction) and the file's stamp (for the next fast verification);
        best effort, so a read-only cache still serves hits."""
        with contextlib.suppress(OSError, CacheError), self._index_lock():
            index = self._load(True)
            info = index["modules"].get(sha256)
            if info is not None:
                info["last_used"] = time.time()
                info["stamp"] = stamp
                self._write_index(index)

    @contextlib.contextmanager
    def temp_file(self) -> Iterator[tuple[Path, IO[bytes]]]:
        """A scratch file in the cache's filesystem; removed on exit whatever happens. A write that
        fails (disk full, read-only) is a CacheError."""
        try:
            fd, name = tempfile.mkstemp(dir=self._tmp, prefix="fetch.")
        except OSError as exc:
            raise CacheError(f"cache directory {self._tmp}: cannot create a file ({_errno_text(exc)})") from None
        path = Path(name)
        try:
            with os.fdopen(fd, "w+b") as handle:
                yield path, handle
        except OSError as exc:
            if exc.errno is None:
                raise  # not a filesystem error (a network error escaping is a bug; let it show)
            raise CacheError(f"cache directory {self._tmp}: cannot write ({_errno_text(exc)})") from None
        finally:
            with contextlib.suppress(OSError):
                path.unlink()

    def store(
        self,
        temp: Path,
        sha256: str,
        size: int,
        keys: Sequence[str],
        digest: str,
        source: str,
        layout: str | None = None,
    ) -> CachedModule:
        """Publish a verified module file (renamed, not copied) and point `keys` at it. If the index
        cannot be written, a module file published by this call is removed again."""
        if size > self.max_bytes:
            raise TooLargeError(f"{source}: module is {size} bytes, more than the cache cap of {self.max_bytes}")
        self._check_layout()
        final = self.path_for(sha256)
        published = False
        try:
            os.chmod(temp, self._file_mode)
            written = os.lstat(temp)
            with self._index_lock():
                index = self._load(True)
                known = sha256 in index["modules"]
                os.replace(temp, final)  # same bytes if another process got here first
                published = not known
                after = os.lstat(final)
                now = time.time()
                # The stamp is taken after the rename (which changes ctime) and only if it is still our file.
                same = (after.st_dev, after.st_ino) == (written.st_dev, written.st_ino)
                index["modules"][sha256] = {"size": size, "last_used": now, "stamp": _stamp(after) if same else None}
                for key in keys:
                    index["refs"][key] = _ref(sha256, digest, source, layout, now)
                self._evict(index, keep=sha256)
                self._write_index(index)
        except (OSError, CacheError) as exc:
            if published:
                self._remove(final)
            if isinstance(exc, CacheError):
                raise
            raise CacheError(f"cache directory {self.root}: cannot store module ({_errno_text(exc)})") from None
        return CachedModule(sha256, final, size, digest, source, layout)

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
            self._remove(self.path_for(sha))

    def _drop(self, index: dict[str, Any], sha: str) -> None:
        """Forget a module; its file goes at once on eviction, or in `gc`'s sweep."""
        index["modules"].pop(sha, None)
        index["refs"] = {k: v for k, v in index["refs"].items() if v["module"] != sha}

    def store_keys(
        self, module: CachedModule, keys: Sequence[str], source: str | None = None, layout: str | None = None
    ) -> CachedModule:
        """Point more keys at a module already cached (a tag re-resolved to a known digest, or another
        tag of the same image); the keys record `source` (default: the module's) and `layout`."""
        source = module.source if source is None else source
        layout = module.layout if layout is None else layout
        with self._index_lock():
            index = self._load(True)
            if module.sha256 not in index["modules"]:
                raise CacheError(f"cache index {self._index}: module {module.sha256} vanished during the pull")
            now = time.time()
            index["modules"][module.sha256]["last_used"] = now
            for key in keys:
                index["refs"][key] = _ref(module.sha256, module.digest, source, layout, now)
            self._write_index(index)
        return CachedModule(module.sha256, module.path, module.size, module.digest, source, layout)

    def entries(self) -> list[tuple[str, CachedModule]]:
        """(source key, module) for every index entry whose module file is on disk (not verified:
        `find` verifies before a hand-out, `gc` before keeping)."""
        index = self._load(False)
        found = []
        for key, ref in sorted(index["refs"].items()):
            sha = ref["module"]
            path = self.path_for(sha)
            if path.is_file() and not path.is_symlink():
                found.append((key, _module(sha, path, int(index["modules"][sha]["size"]), ref)))
        return found

    def _module_files(self) -> list[Path]:
        """Files under modules/ named as modules; anything else there (links, strays) is removed."""
        found = []
        for path in self._modules.iterdir():
            if _MODULE_NAME.fullmatch(path.name) and stat.S_ISREG(os.lstat(path).st_mode):
                found.append(path)
            elif not path.is_dir() or path.is_symlink():
                self._remove(path)
        return found

    def gc(self, max_age: float | None = None) -> GcResult:
        """Repair and trim: re-hash every module and remove those that changed, drop modules not used
        for `max_age` seconds, module files no entry refers to, entries whose file is gone, and temp
        files of crashed fetches. A corrupt index is rebuilt first."""
        removed = removed_bytes = temps = corrupt = 0
        now = time.time()
        try:
            with self._index_lock():
                try:
                    index = self._read_index()
                    rebuilt = False
                except _CorruptIndex as bad:
                    index, rebuilt = self._rebuild(str(bad)), True
                referenced = {ref["module"] for ref in index["refs"].values()}
                for sha, info in list(index["modules"].items()):
                    old = max_age is not None and now - float(info["last_used"]) > max_age
                    if old or sha not in referenced:
                        self._drop(index, sha)
                for path in self._modules.iterdir():
                    name = path.name.removesuffix(".wasm")
                    st = os.lstat(path)
                    if name in index["modules"]:
                        verdict = self._check_file(name, index["modules"][name], full=True)
                        if verdict.stamp is not None:
                            index["modules"][name]["stamp"] = verdict.stamp
                            continue
                        corrupt += 1
                        self._drop(index, name)
                    if stat.S_ISDIR(st.st_mode):
                        self._remove(path)  # only if empty: a full directory is not ours to delete
                        continue
                    removed += 1
                    removed_bytes += st.st_size if stat.S_ISREG(st.st_mode) else 0
                    self._remove(path)
                for sha in [sha for sha in index["modules"] if not self.path_for(sha).is_file()]:
                    self._drop(index, sha)
                for path in self._tmp.iterdir():
                    st = os.lstat(path)
                    if stat.S_ISLNK(st.st_mode) or (
                        not stat.S_ISDIR(st.st_mode) and now - st.st_mtime > _STALE_TMP_SECONDS
                    ):
                        temps += 1
                        self._remove(path)
                self._write_index(index)
                compiled, compiled_bytes = self._sweep_compiled(set(index["modules"]), now, max_age)
        except OSError as exc:
            raise CacheError(f"cache directory {self.root}: cannot clean up ({_errno_text(exc)})") from None
        return GcResult(removed, removed_bytes, temps, corrupt, rebuilt, compiled, compiled_bytes)

    def _sweep_compiled(self, cached: set[str], now: float, max_age: float | None) -> tuple[int, int]:
        """The host's compiled code under `compiled/`: drop artifacts of modules no longer cached (once
        unused for an hour, so a module run from a local file keeps its code a while), everything unused
        for `max_age`, leftovers of crashed writes, and anything that is not a regular file."""
        directory = self.root / COMPILED_DIR
        if not directory.is_dir() or directory.is_symlink():
            return 0, 0
        removed = removed_bytes = 0
        for path in directory.iterdir():
            st = os.lstat(path)
            idle = now - st.st_mtime
            match = _COMPILED_NAME.fullmatch(path.name)
            if stat.S_ISREG(st.st_mode) and match is not None:
                drop = (max_age is not None and idle > max_age) or (
                    match.group(1) not in cached and idle > _STALE_TMP_SECONDS
                )
            else:
                drop = not stat.S_ISREG(st.st_mode) or idle > _STALE_TMP_SECONDS
            if drop and not stat.S_ISDIR(st.st_mode):
                removed += 1
                removed_bytes += st.st_size if stat.S_ISREG(st.st_mode) else 0
                self._remove(path)
        return removed, removed_bytes


@dataclass(frozen=True)
class _Verdict:
    """A module file checked: its stamp if it is good, else the problem."""

    stamp: list[int] | None
    problem: str | None
    rehashed: bool = False


_LAYOUTS = ("oci", "compat")


def _ref(sha256: str, digest: str, source: str, layout: str | None, fetched: float) -> dict[str, Any]:
    """An index entry pointing a source key at a module (`layout` only for images)."""
    ref: dict[str, Any] = {"module": sha256, "digest": digest, "source": source, "fetched": fetched}
    if layout is not None:
        ref["layout"] = layout
    return ref


def _module(sha256: str, path: Path, size: int, ref: dict[str, Any]) -> CachedModule:
    return CachedModule(sha256, path, size, str(ref["digest"]), str(ref["source"]), ref.get("layout"))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validated(document: Any) -> dict[str, Any]:
    """The index with every misshapen entry dropped; _CorruptIndex if its frame is wrong."""
    if not isinstance(document, dict) or document.get("version") != 1:
        raise _CorruptIndex("has an unknown format (expected a version 1 object)")
    raw_modules, raw_refs = document.get("modules"), document.get("refs")
    if not isinstance(raw_modules, dict) or not isinstance(raw_refs, dict):
        raise _CorruptIndex("has no 'modules' and 'refs' objects")
    modules: dict[str, Any] = {}
    for sha, info in raw_modules.items():
        if not (_HEX64.fullmatch(sha) and isinstance(info, dict)):
            continue
        size, stamp = info.get("size"), info.get("stamp")
        last_used: Any = info.get("last_used")
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0 and _number(last_used)):
            continue
        good_stamp = isinstance(stamp, list) and len(stamp) == 5 and all(type(n) is int for n in stamp)
        modules[sha] = {"size": size, "last_used": float(last_used), "stamp": stamp if good_stamp else None}
    refs: dict[str, Any] = {}
    for key, ref in raw_refs.items():
        if not isinstance(ref, dict) or not isinstance(ref.get("module"), str) or ref["module"] not in modules:
            continue
        digest, source, fetched = ref.get("digest"), ref.get("source"), ref.get("fetched", 0.0)
        if isinstance(digest, str) and isinstance(source, str) and _number(fetched):
            layout = ref.get("layout")
            refs[key] = _ref(ref["module"], digest, source, layout if layout in _LAYOUTS else None, float(fetched))
    return {"version": 1, "modules": modules, "refs": refs}
