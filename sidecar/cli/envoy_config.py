"""`sidecar envoy-config`: an Envoy bootstrap that routes through this sidecar, for the configured plugins."""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidecar.cli.serve import SOURCES_HELP, add_source_args, resolve
from sidecar.config import DEFAULT_SOCKET
from sidecar.errors import ConfigError

__all__ = ["add_commands"]


def _envoy_config(args: argparse.Namespace) -> int:
    import yaml

    from sidecar.config import parse_host_port
    from sidecar.translate.bootstrap import BootstrapOptions, build_bootstrap, parse_route

    if args.in_process:
        _refuse_sidecar_flags(args)
    elif args.env_file is not None:
        raise ConfigError("--env-file: only with --in-process (the ext_proc path needs no environment)")
    config, registry = resolve(args)
    host, port = parse_host_port(args.listen_address, "--listen-address")
    options = BootstrapOptions(
        listen_host=host,
        listen_port=port,
        upstream=parse_host_port(args.upstream, "--upstream"),
        routes=tuple(parse_route(r) for r in args.route) if args.route else BootstrapOptions().routes,
        failure_mode_allow=args.failure_mode_allow,
        access_log=args.access_log,
        otlp_endpoint=parse_host_port(args.otlp_endpoint, "--otlp-endpoint")
        if args.otlp_endpoint is not None
        else None,
    )
    if args.in_process:
        return _in_process(args, config, registry, options)
    bootstrap = build_bootstrap(registry, config, options)
    if args.failure_mode_allow:
        sys.stderr.write(
            "warning: --failure-mode-allow: requests go through unprocessed when the sidecar cannot be reached, "
            "times out or fails a stream\n"
        )
    if args.validate:
        from sidecar.stack.envoy import validate_bootstrap

        validate_bootstrap(bootstrap)
        for path in _silent_sockets(config.socket_paths()):
            print(
                f"sidecar: warning: nothing listens on unix:{path}; Envoy will answer 500 until "
                "`sidecar serve` runs with the same config (or the same --listen)",
                file=sys.stderr,
            )
    sys.stdout.write(yaml.safe_dump(bootstrap, sort_keys=False))
    return 0


def _refuse_sidecar_flags(args: argparse.Namespace) -> None:
    """What only the ext_proc path has, refused in one line before anything loads."""
    if args.plugin:
        raise ConfigError(
            "--plugin: with --in-process Envoy loads the plugins from the config file itself; list them in "
            "the -c FILE's chains"
        )
    if args.config is None:
        raise ConfigError("--in-process needs -c FILE: Envoy's module loads the chains from that file")
    for flag, given in (("--listen", args.listen), ("--workers", args.workers)):
        if given is not None:
            raise ConfigError(f"{flag}: there is no sidecar process with --in-process (the chains run in Envoy)")


def _in_process(args: argparse.Namespace, config: Any, registry: Any, options: Any) -> int:
    import yaml

    from sidecar.inprocess.module import envoy_environment
    from sidecar.stack.inprocess import inprocess_bootstrap, write_env_file

    bootstrap = inprocess_bootstrap(registry, config, Path(args.config).resolve(), options)
    environment = envoy_environment()
    if args.validate:
        from sidecar.stack.envoy import validate_bootstrap

        validate_bootstrap(bootstrap, env=environment)
    if args.env_file is not None:
        write_env_file(args.env_file, environment)
    else:
        lines = "".join(f"  {key}={shlex.quote(value)}\n" for key, value in environment.items())
        sys.stderr.write(f"sidecar: run Envoy with this environment (or write it with --env-file):\n{lines}")
    sys.stdout.write(yaml.safe_dump(bootstrap, sort_keys=False))
    return 0


def _silent_sockets(paths: Sequence[Path]) -> list[Path]:
    """The sockets Envoy will be pointed at that accept no connection now (connect only: nothing is sent)."""
    silent = []
    for path in paths:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                silent.append(path)
    return silent


def _seconds(text: str) -> float:
    """argparse type: a timeout in seconds, refused before anything loads (NaN and 0 included)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.001 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds from 0.001 to 3600, got {text!r}")
    return value


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    envoy = subparsers.add_parser(
        "envoy-config",
        help="print an Envoy bootstrap that routes through this sidecar",
        description=(
            "Print a minimal Envoy bootstrap (listener -> ext_proc -> router -> upstream) whose processing mode "
            "is derived from the configured plugins. " + SOURCES_HELP
        ),
    )
    add_source_args(envoy)
    envoy.add_argument(
        "--listen",
        help=f"the sidecar's unix:PATH (default: the config file's listen:, else unix:{DEFAULT_SOCKET}, as "
        "`sidecar serve` resolves it; --validate warns when nothing listens there)",
    )
    envoy.add_argument("--workers", type=int, help="number of sidecar workers (one endpoint each)")
    envoy.add_argument(
        "--message-timeout",
        type=_seconds,
        help="ext_proc message_timeout in seconds (default 0.5); with --in-process, each hook's deadline",
    )
    envoy.add_argument("--listen-address", default="127.0.0.1:10000", help="Envoy's listener (default %(default)s)")
    envoy.add_argument("--upstream", default="127.0.0.1:8080", help="the backend HOST:PORT (default %(default)s)")
    envoy.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="PREFIX[=CHAIN]",
        help="a route and the chain it uses (repeatable; default: / with the default chain)",
    )
    envoy.add_argument(
        "--failure-mode-allow",
        action="store_true",
        help="let requests through unprocessed when the sidecar cannot be reached or times out (plugin errors "
        "still follow each chain's on_error); refused with FULL_DUPLEX_STREAMED",
    )
    envoy.add_argument(
        "--access-log",
        metavar="PATH",
        help="write Envoy's access log to PATH: JSON lines with the plugins' dynamic metadata",
    )
    envoy.add_argument(
        "--otlp-endpoint",
        metavar="HOST:PORT",
        help="turn on Envoy's OpenTelemetry tracer, sending to this OTLP gRPC collector (give the sidecar --tracing "
        "and OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:PORT to join its spans to Envoy's traces)",
    )
    envoy.add_argument("--validate", action="store_true", help="check the result with `envoy --mode validate`")
    envoy.add_argument(
        "--in-process",
        action="store_true",
        help="run the chains inside Envoy (a dynamic-module filter; no sidecar process): faster, but a crash "
        "in a plugin's C code takes Envoy down and one Python serves all of Envoy's workers (docs/in-process.md). "
        "Plugins come from -c FILE only; the environment Envoy needs goes to stderr, or to --env-file",
    )
    envoy.add_argument(
        "--env-file",
        type=Path,
        metavar="PATH",
        help="with --in-process: write the environment Envoy needs to PATH (KEY=VALUE lines) instead of stderr",
    )
    envoy.set_defaults(func=_envoy_config)
