"""Wasm fetcher benchmark: pull throughput from a local docker-registry against a plain download of
the same blob (urllib and curl), and the cache-hit path of a digest reference (registry stopped, so
any network round trip would fail).

    .venv/bin/python benchmarks/wasm_fetch.py [--size-mib 10] [--rounds 5]

Needs Debian's docker-registry on PATH. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from sidecar.wasm.fetch.cache import ModuleCache
from sidecar.wasm.fetch.fetcher import ModuleFetcher
from sidecar.wasm.fetch.layout import push_image
from sidecar.wasm.fetch.transfer import FetchOptions


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _module(size: int) -> bytes:
    # Incompressible payload in a custom section: a realistic worst case for a download.
    payload = os.urandom(size)
    name = b"bench"
    body = bytes([len(name)]) + name + payload
    length, leb = len(body), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        leb.append(byte | (0x80 if length else 0))
        if not length:
            break
    return b"\0asm\x01\x00\x00\x00\x00" + bytes(leb) + body


def _start_registry(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\nlog: {level: error, accesslog: {disabled: true}}\n"
        f"storage: {{filesystem: {{rootdirectory: {directory / 'data'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}', secret: bench}}\n"
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    end = time.monotonic() + 15
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1):
                return proc, f"127.0.0.1:{port}"
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("docker-registry did not start")


def _timed(fn: object, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hits", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wasm-bench-"))
    proc, host = _start_registry(work)
    try:
        module = _module(int(args.size_mib * (1 << 20)))
        (work / "m.wasm").write_bytes(module)
        options = FetchOptions(insecure_hosts=frozenset({host}))
        pushed = push_image(work / "m.wasm", f"{host}/bench/module:v1", "oci", options)
        layer_digest = "sha256:" + hashlib.sha256(module).hexdigest()
        blob_url = f"http://{host}/v2/bench/module/blobs/{layer_digest}"
        ref = f"{host}/bench/module@{pushed.manifest_digest}"
        counter = iter(range(10**6))

        def pull() -> None:
            cache = ModuleCache(work / f"cache{next(counter)}")
            ModuleFetcher(cache, options).pull_image(ref)

        def urllib_get() -> None:
            with urllib.request.urlopen(blob_url, timeout=30) as resp, open(work / "plain.bin", "wb") as out:
                shutil.copyfileobj(resp, out, 256 << 10)

        def curl_get() -> None:
            subprocess.run(["curl", "-sSf", "-o", str(work / "curl.bin"), blob_url], check=True)

        pull()  # warm-up: imports, registry caches
        t_pull = _timed(pull, args.rounds)
        t_urllib = _timed(urllib_get, args.rounds)
        t_curl = _timed(curl_get, args.rounds) if shutil.which("curl") else []

        hit_cache = ModuleCache(work / "hits")
        fetcher = ModuleFetcher(hit_cache, options)
        fetcher.pull_image(ref)
        proc.terminate()
        proc.wait(timeout=10)
        start = time.perf_counter()
        for _ in range(args.hits):
            assert fetcher.pull_image(ref).cache_hit
        per_hit = (time.perf_counter() - start) / args.hits
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    mib = len(module) / (1 << 20)
    best = {
        "sidecar pull (manifest + blob, verified, cached)": min(t_pull),
        "urllib GET of the blob": min(t_urllib),
    }
    if t_curl:
        best["curl GET of the blob"] = min(t_curl)
    print(f"module {mib:.1f} MiB, best of {args.rounds} (median in brackets)\n")
    print("| path | time | throughput |\n|---|---|---|")
    medians = {
        "sidecar pull (manifest + blob, verified, cached)": t_pull,
        "urllib GET of the blob": t_urllib,
        "curl GET of the blob": t_curl,
    }
    for name, seconds in best.items():
        print(
            f"| {name} | {seconds * 1000:.1f} ms ({statistics.median(medians[name]) * 1000:.1f})"
            f" | {mib / seconds:.0f} MiB/s |"
        )
    print(
        f"\npull / urllib = {min(t_pull) / min(t_urllib):.2f}x"
        + (f", pull / curl = {min(t_pull) / min(t_curl):.2f}x" if t_curl else "")
    )
    print(f"cache hit, digest reference, registry stopped: {per_hit * 1e6:.0f} us per pull_image() ({args.hits} calls)")


if __name__ == "__main__":
    main()
