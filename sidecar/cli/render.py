"""`sidecar render -f FILES`: EG resources -> an Envoy bootstrap, or (--format eg) an EG bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "add_render_arguments", "render_options"]


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `render` and `up -f`."""
    parser.add_argument(
        "--sidecar-config",
        type=Path,
        metavar="FILE",
        help="sidecar config (plugins/chains): extProc Backends that are this sidecar get its "
        "processing mode and sockets",
    )
    parser.add_argument(
        "--dns-resolver",
        metavar="HOST:PORT",
        help="resolve FQDN Backends with this DNS server (c-ares) instead of the system's",
    )


def render_options(args: argparse.Namespace, **overrides: Any) -> Any:
    from sidecar.chains import Registry
    from sidecar.config import load_config, parse_host_port
    from sidecar.translate.options import RenderOptions, SidecarLink
    from sidecar.translate.wasmsource import fetch_module

    sidecar = None
    if args.sidecar_config is not None:
        config = load_config(args.sidecar_config)
        sidecar = SidecarLink(Registry.from_specs(config.chains), tuple(config.socket_paths()), config.message_timeout)
    kwargs: dict[str, Any] = {
        "sidecar": sidecar,
        "fetch_module": lambda code, secrets: fetch_module(code, pull_secrets=secrets),
    }
    if args.dns_resolver:
        kwargs["dns_resolver"] = parse_host_port(args.dns_resolver, "--dns-resolver")
    kwargs.update(overrides)
    return RenderOptions(**kwargs)


def _render(args: argparse.Namespace) -> int:
    from sidecar.stack.envoy import validate_bootstrap
    from sidecar.translate.render import dump_yaml, render_bootstrap

    if args.format == "eg":
        from sidecar.stack.up import demo_config_path
        from sidecar.translate.bundle import render_bundle

        text = render_bundle(args.files, args.sidecar_config or demo_config_path(), image=args.image)
    else:
        bootstrap = render_bootstrap(args.files, render_options(args))
        if args.validate:
            validate_bootstrap(bootstrap)
        text = dump_yaml(bootstrap)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    render = subparsers.add_parser(
        "render",
        help="translate Envoy Gateway resources into an Envoy bootstrap",
        description=(
            "Read Gateway, HTTPRoute, Backend, BackendTLSPolicy, EnvoyExtensionPolicy, SecurityPolicy, "
            "ClientTrafficPolicy, BackendTrafficPolicy and EnvoyProxy resources (plus the Secrets and "
            "ConfigMaps they reference) and print a complete Envoy bootstrap that a stock Envoy runs."
        ),
    )
    render.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        required=True,
        metavar="FILE_OR_DIR",
        help="YAML file or directory of them (repeatable)",
    )
    render.add_argument(
        "--format",
        choices=("envoy", "eg"),
        default="envoy",
        help="envoy: a bootstrap for a stock Envoy (default); eg: the EG resources that run this "
        "sidecar next to an EG-managed Envoy",
    )
    render.add_argument("--image", default="envoy-sidecar:latest", help="sidecar container image (--format eg)")
    render.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    render.add_argument("--validate", action="store_true", help="also run `envoy --mode validate` on the result")
    add_render_arguments(render)
    render.set_defaults(func=_render)
