"""`sidecar wasm ...`: one command group; each part of the Wasm package adds its subcommands here."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

# Modules with an `add_wasm_commands(subparsers)` function.
_SUBCOMMAND_MODULES: tuple[str, ...] = ("sidecar.wasm.fetchcli", "sidecar.wasm.host.cli")


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    wasm = subparsers.add_parser(
        "wasm",
        help="fetch, cache, push and run proxy-wasm modules",
        description="Fetch, verify, cache and push proxy-wasm modules, and run them locally as Envoy would.",
    )
    group = wasm.add_subparsers(dest="wasm_command", metavar="WASM_COMMAND", required=True)
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).add_wasm_commands(group)
