"""The examples in README.md and docs/ run as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sidecar.testing import Driver, Request, Response

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_readme_plugin_example_behaves_as_documented() -> None:
    namespace: dict[str, Any] = {}
    exec(python_blocks(ROOT / "README.md")[0], namespace)
    plugin = namespace["RequireToken"]()
    denied = Driver([plugin]).run(Request("GET", "/"))
    assert denied.immediate and denied.status == 401
    allowed = Driver([plugin]).run(
        Request("POST", "/", headers={"authorization": "Bearer x"}, body=b"my secret"),
        Response(200, headers={"content-type": "text/plain"}, body=b"ok"),
    )
    assert allowed.upstream is not None and allowed.upstream.body == b"my ******"
    assert allowed.upstream.headers["x-request-id"]


def test_testing_guide_examples_pass() -> None:
    namespace: dict[str, Any] = {}
    exec(python_blocks(ROOT / "README.md")[0], namespace)
    guide = python_blocks(ROOT / "docs" / "testing.md")[0].replace("from mycompany.plugins import RequireToken\n", "")
    exec(guide, namespace)
    namespace["test_requires_a_token"]()
    namespace["test_passes_with_a_token"]()


def test_architecture_page_names_every_module_and_only_modules_that_exist() -> None:
    """docs/architecture.md matches the tree: a module added, moved or removed must be reflected there."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:[a-z0-9_]+/)*[a-z0-9_]+\.py)`", page))
    files = [p.relative_to(ROOT).as_posix() for d in ("sidecar", "tests", "plugins") for p in (ROOT / d).rglob("*.py")]
    assert [name for name in named if not any(f == name or f.endswith("/" + name) for f in files)] == []
    package = ROOT / "sidecar"
    modules = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") or p.parent.name == "cli"
    ]
    assert [m for m in modules if m not in named and not _named_in_section(page, m)] == []


def _named_in_section(page: str, module: str) -> bool:
    """`http2/call.py` in the section headed `extproc/` names extproc/http2/call.py."""
    for section in re.split(r"^### ", page, flags=re.MULTILINE)[1:]:
        for folder in re.findall(r"`([a-z0-9_/]+)/`", section.splitlines()[0]):
            if module.startswith(folder + "/") and f"`{module[len(folder) + 1 :]}`" in section:
                return True
    return False


def test_no_test_module_imports_another() -> None:
    """CONTRIBUTING.md: what two test modules share lives in tests/support/, so each runs and reads alone."""
    import ast

    offenders = []
    for path in [*(ROOT / "tests").rglob("test_*.py"), *(ROOT / "plugins" / "tests").rglob("test_*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.rpartition(".")[2].startswith("test_")]
    assert offenders == []
