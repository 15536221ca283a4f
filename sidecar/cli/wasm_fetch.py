"""`sidecar wasm pull | push | ls | gc`: the fetcher and cache on the command line (and in an init
container: `sidecar wasm pull --cache-dir /shared/wasm REF` before Envoy starts).

Heavy imports (requests, wasmtime) happen inside the commands, so `sidecar --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

__all__ = ["ProgressLine", "add_reference_args", "add_wasm_commands", "pull_reference"]


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """argparse type: a number above zero (a zero timeout or size would fail deep in the transfer)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
        return value

    return parse


def _at_least_zero(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number from 0, got {text!r}")
    return int(text)


def _common(parser: argparse.ArgumentParser, network: bool) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default $SIDECAR_WASM_CACHE or ~/.cache/sidecar/wasm; the same for render, up -f "
        "and wasm run, whose compiled code goes to compiled/ under it)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    if not network:
        return
    parser.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="allow plain HTTP to this registry or URL host (repeatable; loopback hosts need not be listed: "
        "HTTPS is tried first, then plain HTTP, as docker does)",
    )
    parser.add_argument("--ca-bundle", help="PEM file of CAs to trust instead of the system ones")
    parser.add_argument("--pull-secret", type=Path, help="Docker config.json or Kubernetes dockerconfigjson Secret")
    parser.add_argument("--timeout", type=_positive(float), default=15.0, help="seconds per network call (default 15)")
    parser.add_argument(
        "--deadline", type=_positive(float), default=300.0, help="seconds for the whole transfer (default 300)"
    )
    parser.add_argument(
        "--max-size", type=_positive(int), default=256 << 20, help="largest module in bytes (default 256 MiB)"
    )
    parser.add_argument(
        "--retries", type=_at_least_zero, default=5, help="retries of retryable HTTP errors (default 5)"
    )


def add_wasm_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    pull = subparsers.add_parser("pull", help="fetch a module into the cache (OCI image or HTTPS URL)")
    pull.add_argument("ref", help="image reference ([oci://]host/repo[:tag][@sha256:...]) or https:// URL")
    pull.add_argument("--sha256", help="image: the manifest digest; URL: the body's sha256")
    pull.add_argument(
        "--policy", choices=("Always", "IfNotPresent"), help="default: Always for :latest, else IfNotPresent"
    )
    pull.add_argument(
        "--cache-max-bytes", type=_positive(int), default=1 << 30, help="cache size cap, LRU-evicted (default 1 GiB)"
    )
    pull.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="also write the verified module to FILE (atomically, mode 0644): the path Envoy's "
        "local.filename names, e.g. on a volume shared with Envoy from an init container",
    )
    pull.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress (default: on a terminal)",
    )
    _common(pull, network=True)
    pull.set_defaults(func=_pull)

    push = subparsers.add_parser("push", help="push a module file as an image")
    push.add_argument("file", type=Path, help="the .wasm module")
    push.add_argument("ref", help="image reference with a tag")
    push.add_argument("--layout", choices=("oci", "compat", "docker"), default="oci", help="image layout (default oci)")
    push.add_argument("--index", action="store_true", help="wrap the manifest in a linux/amd64+arm64 image index")
    _common(push, network=True)
    push.set_defaults(func=_push)

    ls = subparsers.add_parser("ls", help="list cached modules")
    _common(ls, network=False)
    ls.set_defaults(func=_ls)

    gc = subparsers.add_parser("gc", help="remove unreferenced, stale or old cached modules")
    gc.add_argument("--max-age", type=float, default=None, help="also drop modules unused for this many seconds")
    _common(gc, network=False)
    gc.set_defaults(func=_gc)


def _options(args: argparse.Namespace) -> Any:
    from sidecar.wasm.fetch.transfer import FetchOptions

    return FetchOptions(
        request_timeout=args.timeout,
        deadline=args.deadline,
        max_module_bytes=args.max_size,
        insecure_hosts=frozenset(args.insecure_registry),
        ca_bundle=args.ca_bundle,
        http_retries=args.retries,
    )


def _cache(args: argparse.Namespace, max_bytes: int | None = None) -> Any:
    from sidecar.wasm.fetch.cache import DEFAULT_MAX_CACHE_BYTES, ModuleCache, default_cache_dir

    return ModuleCache(
        args.cache_dir or default_cache_dir(), max_bytes=DEFAULT_MAX_CACHE_BYTES if max_bytes is None else max_bytes
    )


def _secret(args: argparse.Namespace) -> Any:
    from sidecar.wasm.fetch.auth import load_pull_secret

    return load_pull_secret(args.pull_secret) if args.pull_secret is not None else None


class ProgressLine:
    """Progress on stderr, only once a transfer has run for a second, at most 5 updates a second."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._start = clock()
        self._last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int | None) -> None:
        now = self._clock()
        if now - self._start < 1.0 or now - self._last < 0.2:
            return
        self._last = now
        rate = done / (now - self._start) / (1 << 20)
        of = f" / {total / (1 << 20):.1f}" if total else ""
        self._stream.write(f"\r{done / (1 << 20):.1f}{of} MiB  {rate:.1f} MiB/s ")
        self._stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self._stream.write("\n")


def _pull(args: argparse.Namespace) -> int:
    from sidecar.wasm.fetch.fetcher import ModuleFetcher

    fetcher = ModuleFetcher(_cache(args, args.cache_max_bytes), _options(args))
    show = args.progress if args.progress is not None else (sys.stderr.isatty() and not args.json)
    progress = ProgressLine(sys.stderr) if show else None
    try:
        result = _pull_one(fetcher, args.ref, args.sha256, args.policy, _secret(args), progress)
    finally:
        if progress is not None:
            progress.finish()
    module = result.module
    if args.output is not None:
        _write_output(module.path, module.sha256, args.output)
    if args.json:
        doc = {
            "sha256": module.sha256,
            "path": str(module.path),
            "size": module.size,
            "digest": module.digest,
            "source": module.source,
            "cache_hit": result.cache_hit,
            "layout": result.layout,
        }
        print(json.dumps(doc, sort_keys=True))
    else:
        how = "cached" if result.cache_hit else f"pulled ({result.layout or 'http'})"
        print(f"{module.path}  sha256:{module.sha256}  {module.size} bytes  {how}")
    return 0


def _pull_one(fetcher: Any, ref: str, sha256: str | None, policy: str | None, secret: Any, progress: Any) -> Any:
    if ref.startswith(("https://", "http://")):
        if secret is not None:
            from sidecar.wasm.fetch.errors import BadReferenceError

            raise BadReferenceError("--pull-secret applies to images, not to HTTP URLs")
        return fetcher.pull_http(ref, sha256=sha256, policy=policy, progress=progress)
    return fetcher.pull_image(ref, sha256=sha256, policy=policy, pull_secret=secret, progress=progress)


def add_reference_args(parser: argparse.ArgumentParser) -> None:
    """For commands that take a module reference besides a file (`wasm run`): where and how to pull it."""
    parser.add_argument("--sha256", help="with a reference: image manifest digest, or a URL body's sha256")
    parser.add_argument("--policy", choices=("Always", "IfNotPresent"), help="with a reference: pull policy")
    parser.add_argument("--pull-secret", type=Path, help="with a reference: Docker config.json or Secret manifest")
    parser.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="with a reference: allow plain HTTP to this registry or URL host (loopback ones need not be listed)",
    )
    parser.add_argument("--ca-bundle", help="with a reference: PEM file of CAs to trust")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="with a reference: cache root (default as `sidecar wasm pull`)"
    )


def pull_reference(args: argparse.Namespace, ref: str) -> Path:
    """Pull (or find in the cache) the module `ref` names, with `add_reference_args`' flags and the
    fetcher's default limits; its verified path in the cache."""
    from sidecar.wasm.fetch.fetcher import ModuleFetcher
    from sidecar.wasm.fetch.transfer import FetchOptions

    options = FetchOptions(insecure_hosts=frozenset(args.insecure_registry), ca_bundle=args.ca_bundle)
    fetcher = ModuleFetcher(_cache(args), options)
    result = _pull_one(fetcher, ref, args.sha256, args.policy, _secret(args), None)
    return Path(result.module.path)


def _write_output(source: Path, sha256: str, target: Path) -> None:
    """Copy a cached module to `target` via a temporary file and a rename, re-checking its sha256, so
    Envoy never sees a partial or different file."""
    import hashlib
    import tempfile

    from sidecar.wasm.fetch.errors import CacheError, IntegrityError

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            digest = hashlib.sha256()
            src_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(src_fd, "rb") as src, os.fdopen(fd, "wb") as out:
                while piece := src.read(1 << 20):
                    digest.update(piece)
                    out.write(piece)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != sha256:
                raise IntegrityError(
                    f"cached module {source} changed after it was verified (no longer sha256:{sha256}); "
                    "pull again: the next pull removes it and fetches it anew"
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise CacheError(f"--output {target}: cannot write ({exc.strerror})") from None


def _push(args: argparse.Namespace) -> int:
    from sidecar.wasm.fetch.layout import push_image

    result = push_image(args.file, args.ref, args.layout, _options(args), _secret(args), with_index=args.index)
    if args.json:
        print(json.dumps({"manifest_digest": result.manifest_digest, "index_digest": result.index_digest}))
    else:
        print(result.index_digest or result.manifest_digest)
    return 0


def _ls(args: argparse.Namespace) -> int:
    entries = _cache(args).entries()
    if args.json:
        docs = [
            {
                "key": key,
                "sha256": m.sha256,
                "path": str(m.path),
                "size": m.size,
                "digest": m.digest,
                "source": m.source,
                "layout": m.layout,
            }
            for key, m in entries
        ]
        print(json.dumps(docs, sort_keys=True))
    else:
        for key, module in entries:
            print(f"{module.sha256[:12]}  {module.size:>10}  {key}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    result = _cache(args).gc(max_age=args.max_age)
    if args.json:
        doc = {
            "removed_modules": result.removed_modules,
            "removed_bytes": result.removed_bytes,
            "removed_temp_files": result.removed_temp_files,
            "removed_corrupt": result.removed_corrupt,
            "index_rebuilt": result.index_rebuilt,
            "removed_compiled": result.removed_compiled,
            "removed_compiled_bytes": result.removed_compiled_bytes,
        }
        print(json.dumps(doc, sort_keys=True))
    else:
        rebuilt = "; rebuilt a corrupt index" if result.index_rebuilt else ""
        print(
            f"removed {result.removed_modules} modules ({result.removed_bytes} bytes, "
            f"{result.removed_corrupt} of them corrupt), {result.removed_temp_files} stale temp files and "
            f"{result.removed_compiled} compiled artifacts ({result.removed_compiled_bytes} bytes){rebuilt}"
        )
    return 0
