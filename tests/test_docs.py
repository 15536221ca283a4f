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
