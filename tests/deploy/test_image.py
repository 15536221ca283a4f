"""The sidecar image, built for real from images/Dockerfile with buildah (no Docker daemon), pushed to a
local registry, pulled back, unpacked and run with runc; plus the derived plugin image and the Wasm
filter image recipes.

Opt-in by availability: skipped when the Debian tools (buildah debootstrap skopeo umoci runc
docker-registry) are missing or we are not root; .ci/run installs them, so CI runs it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.stack.sidecar import health_status
from tests.support import imagekit
from tests.support.helm import CHART, Render
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah/umoci/runc here need root"),
    pytest.mark.skipif(bool(imagekit.missing_tools()), reason=f"missing tools: {imagekit.missing_tools()}"),
]

EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
BUILD_TOOLS = ("gcc", "cc", "g++", "c++", "make", "ld", "as", "clang", "cargo", "rustc", "go", "pip", "pip3")
SOCKET_DIR = "/var/run/envoy-sidecar"  # the chart's default socket.dir


@dataclass
class Image:
    tag: str  # in buildah's local storage
    ref: str  # in the test registry
    oci_dir: Path
    bundle: Path
    config: dict[str, Any]
    seconds: float


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image")


@pytest.fixture(scope="module")
def buildah(work: Path) -> imagekit.Buildah:
    return imagekit.Buildah(work / "build.log")


@pytest.fixture(scope="module")
def registry(work: Path) -> Iterator[imagekit.Registry]:
    reg = imagekit.Registry(work / "registry").start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def base(buildah: imagekit.Buildah, work: Path) -> str:
    return buildah.base_image(imagekit.base_rootfs(work / "build.log"))


def _pull_and_unpack(ref: str, dest: Path, log: Path) -> tuple[Path, Path, dict[str, Any]]:
    dest.mkdir(parents=True, exist_ok=True)
    oci_dir, bundle = dest / "oci", dest / "bundle"
    imagekit.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{oci_dir}:test"], timeout=600, log=log
    )
    imagekit.run(["umoci", "unpack", "--image", f"{oci_dir}:test", str(bundle)], timeout=600, log=log)
    return oci_dir, bundle, imagekit.image_config(oci_dir, "test")


@pytest.fixture(scope="module")
def image(buildah: imagekit.Buildah, base: str, registry: imagekit.Registry, work: Path) -> Iterator[Image]:
    started = time.monotonic()
    context = imagekit.build_context(work / "context", buildah.log)
    tag = f"localhost/envoy-sidecar:test-{uuid.uuid4().hex[:8]}"
    buildah(
        "build",
        "--isolation",
        "chroot",
        "--runtime",
        "runc",
        "--layers=false",
        "--pull=never",
        "--build-arg",
        f"BASE={base}",
        "--build-arg",
        "PIP_INSTALL_ARGS=--no-index",
        # The test base is Debian's python3, which has no shared libpython to embed (the official images do):
        # a sidecar-only image, which must say so in one line when asked for the in-process mode.
        "--build-arg",
        "IN_PROCESS=no",
        "-t",
        tag,
        str(context),
        timeout=1200,
    )
    seconds = time.monotonic() - started
    try:
        ref = f"{registry.address}/envoy-sidecar:test"
        buildah("push", "--tls-verify=false", tag, f"docker://{ref}", timeout=600)
        oci_dir, bundle, config = _pull_and_unpack(ref, work / "sidecar", buildah.log)
        print(
            f"\nsidecar image: {config['_layers_bytes'] / 1e6:.1f} MB compressed layers, "
            f"{_du(bundle / 'rootfs') / 1e6:.1f} MB unpacked (base included), built in {seconds:.0f} s"
        )
        yield Image(tag, ref, oci_dir, bundle, config, seconds)
    finally:
        with contextlib.suppress(RuntimeError):
            buildah("rmi", "-f", tag)


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class Container:
    """`runc run` of an unpacked bundle with our args, a read-only root (as the chart runs it) and binds."""

    def __init__(
        self,
        bundle: Path,
        args: Sequence[str],
        binds: Sequence[tuple[Path, str]] = (),
        *,
        host_network: bool = False,
        env: Sequence[str] = (),
    ) -> None:
        self.name = f"es-{uuid.uuid4().hex[:10]}"
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"]["terminal"] = False
        spec["process"]["env"] = [*spec["process"].get("env", []), *env]
        if host_network:  # listen on the host's loopback, as a pod's containers share one
            namespaces = spec["linux"]["namespaces"]
            spec["linux"]["namespaces"] = [n for n in namespaces if n["type"] != "network"]
        spec["process"]["args"] = list(args)
        spec["root"] = {"path": str(bundle / "rootfs"), "readonly": True}
        for source, dest in binds:
            spec["mounts"].append(
                {"destination": dest, "type": "bind", "source": str(source), "options": ["rbind", "rw"]}
            )
        spec["mounts"].append(
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
        )
        self.dir = bundle.parent / self.name
        self.dir.mkdir()
        (self.dir / "config.json").write_text(json.dumps(spec))
        self.proc = subprocess.Popen(
            ["runc", "run", "--bundle", str(self.dir), self.name],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    def communicate(self, timeout: float) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def exec(self, args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runc", "exec", self.name, *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            subprocess.run(["runc", "kill", self.name, "KILL"], check=False, capture_output=True, timeout=10)
            self.proc.wait(10)
        subprocess.run(["runc", "delete", "--force", self.name], check=False, capture_output=True, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _run(bundle: Path, args: Sequence[str], timeout: float = 60) -> tuple[int, str]:
    ctr = Container(bundle, args)
    try:
        return ctr.communicate(timeout)
    finally:
        ctr.close()


# ---- the sidecar image -----------------------------------------------------------------------------


def test_image_config_runs_sidecar_as_65532(image: Image) -> None:
    cfg = image.config["config"]
    assert cfg["User"] == "65532:65532"
    assert cfg["Entrypoint"] == ["sidecar"]
    assert image.config["_layers_bytes"] < 400e6


def test_final_image_has_no_build_tools(image: Image) -> None:
    rootfs = image.bundle / "rootfs"
    dirs = ("usr/bin", "usr/local/bin", "bin", "usr/sbin", "opt/sidecar/bin")
    found = [f"{d}/{tool}" for d in dirs for tool in BUILD_TOOLS if (rootfs / d / tool).exists()]
    assert found == []
    assert not list((rootfs / "usr/lib").glob("gcc/*/*/cc1"))
    assert (rootfs / "opt/sidecar/bin/sidecar").exists()


def test_entrypoint_help(image: Image) -> None:
    code, out = _run(image.bundle, ["sidecar", "--help"])
    assert code == 0, out
    assert "serve" in out and "envoy-config" in out and "wasm" in out
    code, out = _run(image.bundle, ["python", "-c", "import oras, os; print(os.getuid(), os.getgid())"])
    assert (code, out.split()) == (0, ["65532", "65532"]), out


def test_envoy_is_in_the_image_and_a_sidecar_only_image_refuses_in_process_in_one_line(image: Image) -> None:
    code, out = _run(image.bundle, ["envoy", "--version"])
    assert code == 0 and "1.40.0" in out, out
    code, out = _run(
        image.bundle,
        [
            "sh",
            "-c",
            "printf 'plugins: [header-stamp]\\n' > /tmp/s.yaml && sidecar envoy-config --in-process -c /tmp/s.yaml",
        ],
    )
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1, out
    assert lines[0].startswith("sidecar: error: the in-process backend is not installed"), out


def test_serve_answers_grpc_health_and_the_charts_probe(image: Image, render: Render, tmp_path: Path) -> None:
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    os.chown(sock_dir, 65532, 65532)
    socket = sock_dir / "extproc.sock"
    docs = render(CHART / "ci" / "eg-extproc-values.yaml")
    proxy = next(d for d in docs if d["kind"] == "EnvoyProxy")
    inits = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["initContainers"]
    sidecar = next(c for c in inits if c["name"] == "envoy-sidecar")
    args = list(sidecar["args"])  # the chart's command line, verbatim but for the config file it mounts
    args[args.index("--config") + 1] = "/etc/envoy-sidecar/config/sidecar.yaml"
    (tmp_path / "config").mkdir()
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "sidecar.yaml" in d["data"])
    (tmp_path / "config" / "sidecar.yaml").write_text(cm["data"]["sidecar.yaml"])
    assert args[args.index("--listen") + 1] == f"unix:{SOCKET_DIR}/extproc.sock"
    ctr = Container(
        image.bundle,
        ["sidecar", *args],
        binds=[(sock_dir, SOCKET_DIR), (tmp_path / "config", "/etc/envoy-sidecar/config")],
    )
    try:
        deadline = time.monotonic() + 60
        status = "UNREACHABLE"
        while time.monotonic() < deadline and ctr.proc.poll() is None:
            if socket.exists():
                status = health_status(socket, EXTPROC_SERVICE)
                if status == "SERVING":
                    break
            time.sleep(0.1)
        assert status == "SERVING", ctr.proc.poll()
        stat = socket.stat()
        assert (stat.st_uid, stat.st_mode & 0o777) == (65532, 0o660)
        assert health_status(socket, "") == "SERVING"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            done = ctr.exec(sidecar[probe]["exec"]["command"])
            assert done.returncode == 0, (probe, done.stdout, done.stderr)
        broken = ctr.exec([*sidecar["readinessProbe"]["exec"]["command"][:4], f"{SOCKET_DIR}/missing.sock"])
        assert broken.returncode != 0
        subprocess.run(["runc", "kill", ctr.name, "TERM"], check=True, timeout=10)
        code, out = ctr.communicate(30)
        assert code == 0, out
    finally:
        ctr.close()


# ---- a derived image with the user's plugins (images/plugin-image) ---------------------------------


PLUGIN_SOURCE = """
from sidecar import Plugin


class ProbeStamp(Plugin):
    name = "probe-stamp"

    def on_request_headers(self, ctx, headers):
        headers["x-probe"] = "1"
"""


def test_derived_plugin_image(
    image: Image, buildah: imagekit.Buildah, base: str, registry: imagekit.Registry, tmp_path: Path
) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "probe_plugins.py").write_text(PLUGIN_SOURCE)
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=69"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "probe-plugins"\nversion = "1.0"\n'
        '[project.entry-points."sidecar.plugins"]\nprobe-stamp = "probe_plugins:ProbeStamp"\n'
        '[tool.setuptools]\npy-modules = ["probe_plugins"]\n'
    )
    context = tmp_path / "context"
    shutil.copytree(imagekit.ROOT / "images" / "plugin-image", context)
    imagekit.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(context / "dist"), str(pkg)],
        timeout=300,
        log=buildah.log,
    )
    tag = f"localhost/envoy-sidecar-plugins:test-{uuid.uuid4().hex[:8]}"
    buildah(
        "build",
        "--isolation",
        "chroot",
        "--runtime",
        "runc",
        "--layers=false",
        "--pull=never",
        "--build-arg",
        f"BASE={base}",
        "--build-arg",
        f"SIDECAR_IMAGE={image.tag}",
        "--build-arg",
        "PLUGIN_SPEC=probe-plugins",
        "--build-arg",
        "PIP_INSTALL_ARGS=--no-index",
        "-t",
        tag,
        str(context),
        timeout=900,
    )
    try:
        ref = f"{registry.address}/envoy-sidecar-plugins:test"
        buildah("push", "--tls-verify=false", tag, f"docker://{ref}", timeout=600)
    finally:
        buildah("rmi", "-f", tag)
    _, bundle, config = _pull_and_unpack(ref, tmp_path / "derived", buildah.log)
    assert config["config"]["User"] == "65532:65532"
    assert not (bundle / "rootfs/opt/sidecar/bin/pip").exists()
    code, out = _run(bundle, ["sidecar", "plugins", "--plugin", "probe-stamp", "--json"])
    assert code == 0, out
    report = json.loads(out)
    assert "probe-stamp = probe_plugins:ProbeStamp" in report["installed"]
    assert report["chains"]["default"]["plugins"] == ["probe-stamp"]


# ---- the Wasm filter image recipe (images/wasm-filter) ---------------------------------------------

WASM_MODULE = b"\0asm\x01\0\0\0"  # the smallest valid module


def test_wasm_filter_recipe_makes_a_compat_image(
    buildah: imagekit.Buildah, registry: imagekit.Registry, tmp_path: Path
) -> None:
    context = tmp_path / "wasm"
    shutil.copytree(imagekit.ROOT / "images" / "wasm-filter", context)
    (context / "plugin.wasm").write_bytes(WASM_MODULE)
    tag = f"localhost/wasm-filter:test-{uuid.uuid4().hex[:8]}"
    buildah("build", "--isolation", "chroot", "--runtime", "runc", "--layers=false", "-t", tag, str(context))
    try:
        buildah("push", "--tls-verify=false", tag, f"docker://{registry.address}/team/filter:1.0.0")
    finally:
        buildah("rmi", "-f", tag)
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    req = urllib.request.Request(
        f"http://{registry.address}/v2/team/filter/manifests/1.0.0", headers={"Accept": accept}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw, digest = resp.read(), resp.headers["Docker-Content-Digest"]
    assert digest == "sha256:" + hashlib.sha256(raw).hexdigest()  # the `sha256` the chart wants
    inspected = imagekit.run(
        [
            "skopeo",
            "inspect",
            "--tls-verify=false",
            "--format",
            "{{.Digest}}",
            f"docker://{registry.address}/team/filter:1.0.0",
        ],
        timeout=60,
    ).stdout.strip()
    assert inspected == digest
    layer = json.loads(raw)["layers"][-1]
    assert layer["mediaType"].endswith("tar+gzip") or layer["mediaType"].endswith("tar.gzip")
    with urllib.request.urlopen(
        f"http://{registry.address}/v2/team/filter/blobs/{layer['digest']}", timeout=10
    ) as resp:
        blob = resp.read()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        names = [m.name.lstrip("./") for m in tar.getmembers() if m.isfile()]
        assert names == ["plugin.wasm"]
        member = tar.extractfile(
            tar.getmember(tar.getnames()[[n.lstrip("./") for n in tar.getnames()].index("plugin.wasm")])
        )
        assert member is not None and member.read() == WASM_MODULE


# ---- the in-process image: Envoy from the image, the chart's in-process bootstrap ------------------


@pytest.fixture(scope="module")
def shared_python_base(buildah: imagekit.Buildah, base: str) -> str:
    """The Debian base plus this machine's Python (which has a shared libpython) at its own prefix: Debian's
    python3 has none, and the official images cannot be pulled here."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip("this Python has no shared libpython to build the in-process image on")
    prefix = Path(sys.base_prefix)
    name = f"localhost/shared-python:{hashlib.sha256(str(prefix).encode()).hexdigest()[:12]}"
    ctr = buildah("from", "--pull=never", base)
    try:
        mnt = Path(buildah("mount", ctr))
        ignore = shutil.ignore_patterns("site-packages", "test", "__pycache__", "idlelib", "tkinter", "turtledemo")
        copy = mnt / str(prefix).lstrip("/")
        shutil.copytree(prefix, copy, symlinks=True, ignore=ignore)
        for parent in copy.relative_to(mnt).parents:  # /root is 0700: the image's user 65532 must reach Python
            (mnt / parent).chmod(0o755)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        (copy / "lib" / version / "site-packages").mkdir()  # left out above: this machine's packages
        buildah("unmount", ctr)
        path = f"{prefix}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        buildah("config", "--env", f"PATH={path}", ctr)
        buildah("commit", "--format", "oci", ctr, name, timeout=900)
    finally:
        buildah("rm", ctr)
    return name


@pytest.fixture(scope="module")
def inprocess_image(buildah: imagekit.Buildah, shared_python_base: str, work: Path) -> Iterator[Path]:
    """images/Dockerfile with its defaults (IN_PROCESS=yes): the module compiled in the build stage."""
    context = imagekit.build_context(work / "context-inprocess", buildah.log)
    tag = f"localhost/envoy-sidecar:inprocess-{uuid.uuid4().hex[:8]}"
    buildah(
        *("build", "--isolation", "chroot", "--runtime", "runc", "--layers=false", "--pull=never"),
        *("--build-arg", f"BASE={shared_python_base}", "--build-arg", "PIP_INSTALL_ARGS=--no-index"),
        *("-t", tag, str(context)),
        timeout=1500,
    )
    try:
        oci = work / "inprocess-oci"
        buildah("push", tag, f"oci:{oci}:test", timeout=600)
        bundle = work / "inprocess-bundle"
        imagekit.run(["umoci", "unpack", "--image", f"{oci}:test", str(bundle)], timeout=600, log=buildah.log)
        yield bundle
    finally:
        with contextlib.suppress(RuntimeError):
            buildah("rmi", "-f", tag)


def test_in_process_image_has_no_build_tools_and_envoy_loads_the_module(inprocess_image: Path) -> None:
    rootfs = inprocess_image / "rootfs"
    dirs = ("usr/bin", "usr/local/bin", "bin", "usr/sbin", "opt/sidecar/bin")
    assert [f"{d}/{tool}" for d in dirs for tool in BUILD_TOOLS if (rootfs / d / tool).exists()] == []
    for link, inside in (("modules", "libsidecar_inprocess.so"), ("site", "sidecar/__init__.py")):
        target = os.readlink(rootfs / "opt/sidecar" / link)  # absolute inside the image
        assert (rootfs / target.lstrip("/") / inside).is_file(), (link, target)


def test_the_charts_in_process_pod_serves_from_the_image(inprocess_image: Path, render: Render, tmp_path: Path) -> None:
    """The chart's Envoy container as it renders (command, args, env, the two ConfigMaps), run by runc."""
    from sidecar.stack.demo import EchoBackend
    from tests.support.net import free_port

    backend = EchoBackend().start()
    try:
        host, port = backend.address
        listen, ready, admin = free_port(), free_port(), free_port()
        sets = {
            "inProcess.enabled": "true",
            "standalone.upstream.host": host,
            "standalone.upstream.port": str(port),
            "standalone.envoy.port": str(listen),
            "standalone.envoy.readyPort": str(ready),
            "standalone.envoy.adminPort": str(admin),
        }
        docs = render(CHART / "ci" / "standalone-values.yaml", sets=sets)
        envoy = next(c for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"])
        for name, key in (("envoy", "envoy.yaml"), ("config", "sidecar.yaml")):
            (tmp_path / name).mkdir()
            cm = next(d for d in docs if d["kind"] == "ConfigMap" and key in d.get("data", {}))
            (tmp_path / name / key).write_text(cm["data"][key])
        ctr = Container(
            inprocess_image,
            [*envoy["command"], *envoy["args"]],
            binds=[(tmp_path / "envoy", "/etc/envoy"), (tmp_path / "config", "/etc/envoy-sidecar/config")],
            host_network=True,
            env=[f"{e['name']}={e['value']}" for e in envoy["env"]],
        )
        try:
            wait_for(lambda: _answers(f"http://127.0.0.1:{ready}/ready", ctr), 60, "Envoy's /ready in the container")
            with urllib.request.urlopen(f"http://127.0.0.1:{listen}/hello", timeout=10) as resp:
                echoed = json.loads(resp.read())
            assert echoed["headers"]["x-stamped-by"] == "envoy-sidecar"  # header-stamp ran inside Envoy
            subprocess.run(["runc", "kill", ctr.name, "TERM"], check=True, timeout=10)
            code, out = ctr.communicate(60)
            assert code == 0, out
        finally:
            ctr.close()
    finally:
        backend.stop()


def _answers(url: str, ctr: Container) -> bool:
    assert ctr.proc.poll() is None, f"the container exited: {ctr.communicate(5)[1][-2000:]}"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
