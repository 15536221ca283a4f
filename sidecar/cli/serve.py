"""`sidecar serve` and `sidecar plugins`, and the plugin-source flags they share with `sidecar envoy-config`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.cli import envoy_check
from sidecar.config import DEFAULT_SOCKET, TRANSPORTS
from sidecar.errors import ConfigError

if TYPE_CHECKING:
    from sidecar.chains import Registry
    from sidecar.config import SidecarConfig

__all__ = ["SOURCES_HELP", "add_commands", "add_source_args", "resolve"]

SOURCES_HELP = (
    "Plugins come from the config file (-c) and/or --plugin; a --plugin is an entry point name from the "
    "`sidecar.plugins` group (see `sidecar plugins`) or a module:attr string."
)


def add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="sidecar config file (YAML or TOML)")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="USE",
        help="add a plugin to the default chain (repeatable); e.g. header-stamp or mypkg.mod:MyPlugin",
    )


_OVERRIDABLE = (
    "listen",
    "tcp",
    "workers",
    "metrics",
    "grace_period",
    "log_format",
    "message_timeout",
    "socket_mode",
    "transport",
    "tracing",
    "access_log",
)


def resolve(args: argparse.Namespace) -> tuple[SidecarConfig, Registry]:
    """The config file, --plugin and the flags that override config fields -> config and loaded chains."""
    from sidecar.chains import load_sidecar

    overrides = {name: value for name in _OVERRIDABLE if (value := getattr(args, name, None)) is not None}
    return load_sidecar(args.config, args.plugin, **overrides)


def _serve(args: argparse.Namespace) -> int:
    from sidecar.extproc.workers import Supervisor, run_single, worker_command
    from sidecar.logs import setup_logging

    config, registry = resolve(args)
    envoy_check.check_envoy(registry, args)
    setup_logging(config.log_format, args.log_level)
    sockets = config.socket_paths()
    if args.worker_index is not None:
        return run_single(registry, config, sockets[args.worker_index], worker=True)
    if config.workers == 1:
        return run_single(registry, config, sockets[0])
    if config.tcp:
        raise ConfigError("tcp: TCP listening is for a single worker; use unix sockets with --workers")
    from sidecar.extproc.server import prepare_unix_socket

    for path in sockets:  # fail here, once, rather than in N crash-looping workers
        prepare_unix_socket(path)
    commands = [worker_command(args.argv, i) for i in range(config.workers)]
    return Supervisor(commands, config).run_blocking()


def _plugins(args: argparse.Namespace) -> int:
    from importlib.metadata import entry_points

    from sidecar.chains import ENTRY_POINT_GROUP, describe_mode

    installed = sorted(f"{ep.name} = {ep.value}" for ep in entry_points(group=ENTRY_POINT_GROUP))
    registry: Registry | None = None
    if args.config or args.plugin:
        _config, registry = resolve(args)
    report: dict[str, Any] = {"installed": installed, "chains": {}}
    if registry is not None:
        report["filter_processing_mode"] = describe_mode(registry.mode)
        for name, chain in registry.chains.items():
            report["chains"][name] = {
                "on_error": "fail_open" if chain.fail_open else "fail_closed",
                "plugins": [chain.labels[id(p)] for p in chain.plugins],
                "hooks": envoy_check.hook_listing(chain),
                "processing_mode": chain.describe_mode(),
                "declares": envoy_check.declarations(chain),
            }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    print("installed plugins (entry point group sidecar.plugins):")
    for line in installed or ["(none)"]:
        print(f"  {line}")
    for name, chain_report in report["chains"].items():
        print(f"\nchain {name} ({chain_report['on_error']}): {' -> '.join(chain_report['plugins'])}")
        for phase, plugins in chain_report["hooks"].items():
            print(f"  {phase:<18} {', '.join(plugins)}")
        mode = chain_report["processing_mode"]
        print("  processing_mode   " + ", ".join(f"{k}={v}" for k, v in mode.items()))
        for declaration, names in chain_report["declares"].items():
            if names:
                print(f"  {declaration:<21} {', '.join(names)}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the ext_proc gRPC server",
        description="Run the ext_proc gRPC server Envoy calls for every HTTP request. " + SOURCES_HELP,
        epilog="SIGTERM: health turns NOT_SERVING, in-flight streams finish within --grace-period, exit 0.",
    )
    add_source_args(serve)
    serve.add_argument(
        "--listen", help=f"unix:PATH of the socket (default: the config file's listen:, else unix:{DEFAULT_SOCKET})"
    )
    serve.add_argument("--socket-mode", help="permissions of the socket file, octal (default 0660)")
    serve.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (TLS from the config file's tls:)")
    serve.add_argument("--workers", type=int, help="worker processes, each on its own socket NAME-i.sock (default 1)")
    serve.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    serve.add_argument("--grace-period", type=float, help="seconds in-flight streams get on SIGTERM (default 10)")
    serve.add_argument(
        "--transport",
        choices=TRANSPORTS,
        help="gRPC transport: native (the sidecar's own HTTP/2 on the event loop, default) or grpcio (grpc.aio)",
    )
    serve.add_argument(
        "--tracing",
        action="store_true",
        default=None,
        help="OpenTelemetry spans (needs envoy-sidecar[otel]; OTEL_EXPORTER_OTLP_ENDPOINT etc. configure the exporter)",
    )
    serve.add_argument(
        "--access-log", action="store_true", default=None, help="log one line per ext_proc stream (sidecar.access)"
    )
    serve.add_argument("--log-format", choices=("json", "text"), help="log line format (default json)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    envoy_check.add_envoy_args(serve)
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    plugins = subparsers.add_parser(
        "plugins",
        help="list installed plugins, configured chains and the processing mode each needs",
        description="List installed plugins and, given a config, each chain's hooks and Envoy processing mode.",
    )
    add_source_args(plugins)
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_plugins)
