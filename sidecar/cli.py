"""The `sidecar` command line.

Each command lives in the module that owns it and registers itself through an `add_commands(subparsers)`
function listed in `_COMMAND_MODULES`; this module only wires them and turns SidecarError into one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sidecar.errors import SidecarError

_COMMAND_MODULES = (
    "sidecar.extproc.commands",
    "sidecar.runtime.commands",
    "sidecar.wasm.commands",
    "sidecar.translate.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description=(
            "A Python data-plane companion for Envoy: run ext_proc plugins, fetch and test "
            "proxy-wasm modules, and write the Envoy config that matches them."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # worker processes are started with the same arguments
    try:
        result: int = args.func(args)
    except SidecarError as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
