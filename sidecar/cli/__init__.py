"""The `sidecar` command line: the top of the layer stack.

Each command group is a module of this package with an `add_commands(subparsers)` function. The
modules import only argparse at the top; what a command needs (the gRPC server, the translator, the
Wasm fetcher or host) is imported inside the function that runs it, so `sidecar --help` stays fast.
SidecarError (a user mistake) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sidecar.cli import envoy_config, render, serve, up, wasm
from sidecar.errors import SidecarError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description=(
            "A Python data-plane companion for Envoy: run ext_proc plugins, fetch and test "
            "proxy-wasm modules, and write the Envoy config that matches them."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (serve, envoy_config, up, wasm, render):
        module.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # worker processes are started with the same arguments
    try:
        result: int = args.func(args)
        sys.stdout.flush()  # a reader that has gone shows here, not in the interpreter's exit
    except SidecarError as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`sidecar wasm ls --json | head`): stop quietly, as a pipeline expects.
        _discard_stdout()
        return _SIGPIPE_EXIT
    return result


_SIGPIPE_EXIT = 141  # what a shell reports for a command ended by SIGPIPE


def _discard_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail a second time."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (captured output)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
