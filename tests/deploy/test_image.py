"""The sidecar image, built for real from images/Dockerfile with buildah (no Docker daemon), pushed to a
local registry, pulled back, unpacked and run with runc.

Opt-in by availability: skipped when the Debian tools (buildah debootstrap skopeo umoci runc
docker-registry) are missing; .ci/run installs them, so CI runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.runtime.extproc import health_status
from tests.deploy import imagekit

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah/umoci/runc here need root"),
    pytest.mark.skipif(bool(imagekit.missing_tools()), reason=f"missing tools: {imagekit.missing_tools()}"),
]

EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
BUILD_TOOLS = ("gcc", "cc", "g++", "c++", "make", "ld", "as", "clang", "cargo", "rustc", "go")


@dataclass
class Built:
    ref: str
    oci_dir: Path
    bundle: Path
    config: dict[str, object]
    build_seconds: float
    log: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    work = tmp_path_factory.mktemp("image")
    log = work / "build.log"
    started = time.monotonic()
    rootfs = imagekit.base_rootfs(log)
    buildah = imagekit.Buildah(log)
    base = buildah.base_image(rootfs)
    context = imagekit.build_context(work / "context", log)
    tag = f"localhost/envoy-sidecar:test-{uuid.uuid4().hex[:8]}"
    buildah("build", "--isolation", "chroot", "--runtime", "runc", "--layers=false", "--pull=never",
            "--build-arg", f"BASE={base}", "--build-arg", "PIP_INSTALL_ARGS=--no-index",
            "-t", tag, str(context), timeout=900)  # fmt: skip
    build_seconds = time.monotonic() - started
    registry = imagekit.Registry(work / "registry").start()
    try:
        ref = f"{registry.address}/envoy-sidecar:test"
        buildah("push", "--tls-verify=false", tag, f"docker://{ref}", timeout=600)
        buildah("rmi", tag)
        oci_dir = work / "oci"
        imagekit.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{oci_dir}:test"],
                     timeout=600, log=log)  # fmt: skip
        bundle = work / "bundle"
        imagekit.run(["umoci", "unpack", "--image", f"{oci_dir}:test", str(bundle)], timeout=600, log=log)
        config = imagekit.image_config(oci_dir, "test")
        print(f"\nimage: {config['_layers_bytes'] / 1e6:.1f} MB compressed layers, "
              f"{_du(bundle / 'rootfs') / 1e6:.1f} MB unpacked, built in {build_seconds:.0f} s")  # fmt: skip
        yield Built(ref, oci_dir, bundle, config, build_seconds, log)
    finally:
        registry.stop()


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _runc_config(built: Built, args: list[str], mounts: list[tuple[Path, str]] = ()) -> Path:  # type: ignore[assignment]
    """A copy of the unpacked bundle's runtime config with our args and bind mounts."""
    spec = json.loads((built.bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = args
    spec["root"]["readonly"] = True  # as the chart runs it: read-only root filesystem
    for source, dest in mounts:
        spec["mounts"].append({"destination": dest, "type": "bind", "source": str(source), "options": ["rbind", "rw"]})
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]})
    (built.bundle / "config.json").write_text(json.dumps(spec))
    return built.bundle


def _runc(built: Built, name: str, args: list[str], mounts: list[tuple[Path, str]] = ()) -> subprocess.Popen[str]:  # type: ignore[assignment]
    original = (built.bundle / "config.json").read_text()
    try:
        bundle = _runc_config(built, args, mounts)
        return subprocess.Popen(
            ["runc", "run", "--bundle", str(bundle), name],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
    finally:
        # runc reads config.json at create; wait until it has, then restore for the next run.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _runc_state(name):
            time.sleep(0.05)
        (built.bundle / "config.json").write_text(original)


def _runc_state(name: str) -> str:
    proc = subprocess.run(["runc", "state", name], capture_output=True, text=True, check=False, timeout=10)
    return json.loads(proc.stdout)["status"] if proc.returncode == 0 else ""


def test_image_config_runs_sidecar_as_65532(built: Built) -> None:
    cfg = built.config["config"]
    assert isinstance(cfg, dict)
    assert cfg["User"] == "65532:65532"
    assert cfg["Entrypoint"] == ["sidecar"]
    assert built.config["_layers_bytes"] < 400e6  # type: ignore[operator]


def test_final_image_has_no_build_tools(built: Built) -> None:
    rootfs = built.bundle / "rootfs"
    found = [f"{d}/{tool}" for d in ("usr/bin", "usr/local/bin", "bin", "opt/sidecar/bin") for tool in BUILD_TOOLS
             if (rootfs / d / tool).exists()]  # fmt: skip
    assert found == []
    assert not list((rootfs / "usr/lib").glob("gcc*/*/*/cc1"))
    assert not (rootfs / "opt/sidecar/bin/pip").exists()
    assert (rootfs / "opt/sidecar/bin/sidecar").exists()


def test_entrypoint_help(built: Built) -> None:
    name = f"es-help-{uuid.uuid4().hex[:6]}"
    proc = _runc(built, name, ["sidecar", "--help"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "serve" in out and "envoy-config" in out


def test_serve_answers_grpc_health_on_a_shared_socket(built: Built, tmp_path: Path) -> None:
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    os.chown(sock_dir, 65532, 65532)
    socket = sock_dir / "extproc.sock"
    name = f"es-serve-{uuid.uuid4().hex[:6]}"
    proc = _runc(built, name, ["sidecar", "serve", "--plugin", "header-stamp", "--listen",
                               "unix:/var/run/envoy-sidecar/extproc.sock", "--log-format", "text"],
                 mounts=[(sock_dir, "/var/run/envoy-sidecar")])  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        status = "UNREACHABLE"
        while time.monotonic() < deadline and proc.poll() is None:
            if socket.exists():
                status = health_status(socket, EXTPROC_SERVICE)
                if status == "SERVING":
                    break
            time.sleep(0.1)
        assert status == "SERVING", (proc.poll(), proc.stdout.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        stat = socket.stat()
        assert (stat.st_uid, stat.st_mode & 0o777) == (65532, 0o660)
        assert health_status(socket, "") == "SERVING"
        subprocess.run(["runc", "kill", name, "TERM"], check=True, timeout=10)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            subprocess.run(["runc", "kill", name, "KILL"], check=False, timeout=10)
            proc.wait(10)
        subprocess.run(["runc", "delete", "--force", name], check=False, capture_output=True, timeout=10)
        shutil.rmtree(sock_dir, ignore_errors=True)
