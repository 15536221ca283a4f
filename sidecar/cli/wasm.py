"""`sidecar wasm ...`: the Wasm fetcher (`pull`, `push`, `ls`, `gc`) and the local host (`run`) as one group."""

from __future__ import annotations

import argparse
from typing import Any

from sidecar.cli import wasm_fetch, wasm_run

__all__ = ["add_commands"]


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    wasm = subparsers.add_parser(
        "wasm",
        help="fetch, cache, push and run proxy-wasm modules",
        description="Fetch, verify, cache and push proxy-wasm modules, and run them locally as Envoy would.",
    )
    group = wasm.add_subparsers(dest="wasm_command", metavar="WASM_COMMAND", required=True)
    wasm_fetch.add_wasm_commands(group)
    wasm_run.add_wasm_commands(group)
