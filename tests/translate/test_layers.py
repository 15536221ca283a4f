"""The translator's layering: it imports only the layers below it, never gRPC, and inside the package a
render flows one way (resources -> schema/rules/refs -> builders -> bootstrap)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sidecar" / "translate"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "basic"

# What sidecar.translate may import from the rest of the project (DESIGN.md, "Layers").
ALLOWED = ("sidecar.errors", "sidecar.wire", "sidecar.config", "sidecar.plugins", "sidecar.chains", "sidecar.headers")
FORBIDDEN = ("sidecar.extproc", "sidecar.stack", "sidecar.cli", "sidecar.testing")
# Only the seam to the Wasm fetcher may import it.
WASM_SEAM = "wasmsource"

# The package's modules, lowest first: each may import only modules before it. A render reads in this
# order: load, check structure and rules (resolving references), build routes' clusters, policies'
# filters, routes, listeners, assemble the bootstrap.
ORDER = (
    "resources",
    "options",
    "messages",
    "order",
    "schema",
    "refs",
    "rules",
    "backends",
    "policies",
    "routes",
    "gateway",
    "render",
    "bundle",
    "bootstrap",
    "wasmsource",
)

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


def _imports(path: Path) -> list[str]:
    """Every module `path` imports, at top level or inside functions."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


SOURCES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")


def test_order_names_every_module() -> None:
    assert sorted(ORDER) == sorted(p.stem for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_imports_only_go_down(path: Path) -> None:
    below = {f"sidecar.translate.{name}" for name in ORDER[: ORDER.index(path.stem)]}
    wrong = []
    for name in _imports(path):
        if name == "sidecar" or not name.startswith("sidecar."):
            if name == "grpc" or name.startswith(("grpc.", "grpc_")):
                wrong.append(name)
            continue
        if name.startswith("sidecar.translate."):
            ok = name in below
        elif name == "sidecar.wasm" or name.startswith("sidecar.wasm."):
            ok = path.stem == WASM_SEAM
        else:
            ok = name.startswith(ALLOWED)
        if not ok:
            wrong.append(name)
    assert wrong == [], f"{path.name} imports {wrong}"


def test_the_wasm_seam_uses_one_module_of_the_fetcher() -> None:
    fetcher = {n for n in _imports(PACKAGE / f"{WASM_SEAM}.py") if n.startswith("sidecar.wasm")}
    assert len(fetcher) == 1, fetcher
