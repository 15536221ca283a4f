"""What importing the translator loads: never gRPC, nor a layer above it.

The import contracts in pyproject.toml (`make lint`) check the source; this checks what really loads, with
and without a render, since a module imported by a dependency counts too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "basic"
# Layers above the translator (docs/architecture.md): loading one of them would load the gRPC server or more.
FORBIDDEN = ("sidecar.extproc", "sidecar.stack", "sidecar.cli", "sidecar.testing")

_PROBE = """
import importlib, json, pkgutil, sys
import sidecar.translate
for info in pkgutil.iter_modules(sidecar.translate.__path__):
    importlib.import_module("sidecar.translate." + info.name)
if len(sys.argv) > 1:
    from sidecar.translate.options import RenderOptions
    from sidecar.translate.render import render_bootstrap
    render_bootstrap([sys.argv[1]], RenderOptions())
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], check=True, capture_output=True, text=True, timeout=60)
    modules: list[str] = json.loads(out.stdout)
    return modules


def _grpc(modules: list[str]) -> list[str]:
    return [m for m in modules if m == "grpc" or m.startswith("grpc.")]


@pytest.mark.parametrize("render", [False, True], ids=["import", "import-and-render"])
def test_the_translator_does_not_import_grpc_or_the_layers_above_it(render: bool) -> None:
    modules = _modules_after(str(FIXTURE)) if render else _modules_after()
    assert "sidecar.translate.render" in modules
    assert _grpc(modules) == []
    assert [m for m in modules if m.startswith(FORBIDDEN)] == []
