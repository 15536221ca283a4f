"""`sidecar serve`, `sidecar plugins` and `sidecar envoy-config`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from sidecar.config import (
    DEFAULT_CHAIN,
    DEFAULT_SOCKET,
    TRANSPORTS,
    ChainSpec,
    PluginSpec,
    SidecarConfig,
    load_config,
    parse_host_port,
    parse_socket_mode,
)
from sidecar.errors import ConfigError
from sidecar.registry import Registry, describe_mode

__all__ = ["add_commands", "load_sidecar", "resolve"]

_SOURCES_HELP = (
    "Plugins come from the config file (-c) and/or --plugin; a --plugin is an entry point name from the "
    "`sidecar.plugins` group (see `sidecar plugins`) or a module:attr string."
)


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="sidecar config file (YAML or TOML)")
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="USE",
        help="add a plugin to the default chain (repeatable); e.g. header-stamp or mypkg.mod:MyPlugin",
    )  # fmt: skip


def load_sidecar(
    config_path: Path | str | None, plugins: Sequence[str] = (), **overrides: Any
) -> tuple[SidecarConfig, Registry]:
    """Config file, extra plugins for the default chain and overridden settings -> validated config and
    loaded plugins. What `serve`, `plugins`, `envoy-config` and the test harness all start from."""
    config = load_config(config_path) if config_path else SidecarConfig(source="command line")
    if plugins:
        chains = list(config.chains)
        extra = tuple(PluginSpec(use=u) for u in plugins)
        for i, chain in enumerate(chains):
            if chain.name == DEFAULT_CHAIN:
                chains[i] = dataclasses.replace(chain, plugins=chain.plugins + extra)
                break
        else:
            chains.append(ChainSpec(DEFAULT_CHAIN, extra))
        config = dataclasses.replace(config, chains=tuple(chains))
    listen = overrides.get("listen")
    if listen is not None and not listen.startswith("unix:"):
        raise ConfigError(f"--listen: expected unix:PATH, got {listen!r}")
    for name in ("tcp", "metrics"):
        if overrides.get(name) is not None:
            parse_host_port(overrides[name], f"--{name}")
    if "socket_mode" in overrides:
        overrides["socket_mode"] = parse_socket_mode(overrides["socket_mode"], "--socket-mode")
    if overrides.get("workers", 1) < 1:
        raise ConfigError(f"--workers: expected a number >= 1, got {overrides['workers']}")
    config = dataclasses.replace(config, **overrides)
    return config, Registry.from_specs(config.chains)


_OVERRIDABLE = (
    "listen", "tcp", "workers", "metrics", "grace_period", "log_format", "message_timeout", "socket_mode", "transport",
)  # fmt: skip


def resolve(args: argparse.Namespace) -> tuple[SidecarConfig, Registry]:
    overrides = {name: value for name in _OVERRIDABLE if (value := getattr(args, name, None)) is not None}
    return load_sidecar(args.config, args.plugin, **overrides)


def _serve(args: argparse.Namespace) -> int:
    from sidecar.extproc.workers import Supervisor, run_single, worker_command
    from sidecar.logs import setup_logging

    config, registry = resolve(args)
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

    from sidecar.registry import ENTRY_POINT_GROUP, PHASES

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
                "plugins": [p.display_name() for p in chain.plugins],
                "hooks": {ph: [h.plugin for h in chain.hooks[ph]] for ph in PHASES if chain.hooks[ph]},
                "processing_mode": chain.describe_mode(),
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
    return 0


def _envoy_config(args: argparse.Namespace) -> int:
    from sidecar.config import parse_host_port
    from sidecar.translate.bootstrap import BootstrapOptions, build_bootstrap, parse_route

    config, registry = resolve(args)
    host, port = parse_host_port(args.listen_address, "--listen-address")
    options = BootstrapOptions(
        listen_host=host,
        listen_port=port,
        upstream=parse_host_port(args.upstream, "--upstream"),
        routes=tuple(parse_route(r) for r in args.route) if args.route else BootstrapOptions().routes,
    )
    bootstrap = build_bootstrap(registry, config, options)
    if args.validate:
        from sidecar.runtime.envoy import validate_bootstrap

        validate_bootstrap(bootstrap)
    sys.stdout.write(yaml.safe_dump(bootstrap, sort_keys=False))
    return 0


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the ext_proc gRPC server",
        description="Run the ext_proc gRPC server Envoy calls for every HTTP request. " + _SOURCES_HELP,
        epilog="SIGTERM: health turns NOT_SERVING, in-flight streams finish within --grace-period, exit 0.",
    )
    _add_source_args(serve)
    serve.add_argument("--listen", help=f"unix:PATH of the socket (default unix:{DEFAULT_SOCKET})")
    serve.add_argument("--socket-mode", help="permissions of the socket file, octal (default 0660)")
    serve.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (TLS from the config file's tls:)")
    serve.add_argument("--workers", type=int, help="worker processes, each on its own socket NAME-i.sock (default 1)")
    serve.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    serve.add_argument("--grace-period", type=float, help="seconds in-flight streams get on SIGTERM (default 10)")
    serve.add_argument(
        "--transport", choices=TRANSPORTS,
        help="gRPC transport: native (the sidecar's own HTTP/2 on the event loop, default) or grpcio (grpc.aio)",
    )  # fmt: skip
    serve.add_argument("--log-format", choices=("json", "text"), help="log line format (default json)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    plugins = subparsers.add_parser(
        "plugins",
        help="list installed plugins, configured chains and the processing mode each needs",
        description="List installed plugins and, given a config, each chain's hooks and Envoy processing mode.",
    )
    _add_source_args(plugins)
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_plugins)

    envoy = subparsers.add_parser(
        "envoy-config",
        help="print an Envoy bootstrap that routes through this sidecar",
        description=(
            "Print a minimal Envoy bootstrap (listener -> ext_proc -> router -> upstream) whose processing mode "
            "is derived from the configured plugins. " + _SOURCES_HELP
        ),
    )
    _add_source_args(envoy)
    envoy.add_argument("--listen", help=f"the sidecar's unix:PATH (default unix:{DEFAULT_SOCKET})")
    envoy.add_argument("--workers", type=int, help="number of sidecar workers (one endpoint each)")
    envoy.add_argument("--message-timeout", type=float, help="ext_proc message_timeout in seconds (default 0.5)")
    envoy.add_argument("--listen-address", default="127.0.0.1:10000", help="Envoy's listener (default %(default)s)")
    envoy.add_argument("--upstream", default="127.0.0.1:8080", help="the backend HOST:PORT (default %(default)s)")
    envoy.add_argument(
        "--route", action="append", default=[], metavar="PREFIX[=CHAIN]",
        help="a route and the chain it uses (repeatable; default: / with the default chain)",
    )  # fmt: skip
    envoy.add_argument("--validate", action="store_true", help="check the result with `envoy --mode validate`")
    envoy.set_defaults(func=_envoy_config)
