"""docs/wasm-host.md's host-function and property tables name exactly what the host provides."""

from __future__ import annotations

import re
from pathlib import Path

from sidecar.wasm.host.binding import host_functions
from sidecar.wasm.host.imports import Env
from sidecar.wasm.host.wasi import Wasi
from tests.support.wasm_fixtures.properties import PROPERTIES

DOCS = Path(__file__).parents[3] / "docs" / "wasm-host.md"
STATUSES = {"exact", "approximated", "stubbed"}


def _table(heading: str) -> dict[str, str]:
    """First-column names (each backticked name in the cell) -> status, for the table under `heading`."""
    text = DOCS.read_text()
    section = text.split(f"\n### {heading}\n", 1)[1].split("\n### ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows[name] = cells[1]
    return rows


def test_every_linked_host_function_is_in_the_table_and_nothing_else() -> None:
    table = _table("Host functions")
    linked = set(host_functions(Env)) | set(host_functions(Wasi))
    assert set(table) == linked, (sorted(linked - set(table)), sorted(set(table) - linked))
    assert set(table.values()) <= STATUSES


def test_every_property_the_differential_suite_reads_is_in_the_table() -> None:
    table = _table("Properties")
    assert set(table.values()) <= STATUSES
    documented = {re.sub(r"\.headers\..*", ".headers.<name>", p) for p in PROPERTIES}
    assert documented <= set(table), sorted(documented - set(table))
