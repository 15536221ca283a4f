"""`sidecar wasm run`: run one request through a proxy-wasm module and print what Envoy would do.

The host (and wasmtime) is imported inside the command, so `sidecar --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.cli import wasm_fetch
from sidecar.errors import ConfigError

if TYPE_CHECKING:
    from sidecar.wasm.host.exchange import Exchange
    from sidecar.wasm.host.plugin import Plugin
    from sidecar.wasm.host.state import HttpCall, HttpCallResponse

__all__ = ["add_wasm_commands"]

_BODY_PREVIEW = 2000


def add_wasm_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    run = subparsers.add_parser(
        "run",
        help="run one HTTP exchange through a proxy-wasm module, as Envoy would",
        description="Load MODULE like Envoy's Wasm filter, send one request through it to a canned "
        "upstream response, and print each phase's action, the mutated headers and bodies, any local "
        "reply and the logs.",
    )
    run.add_argument(
        "module",
        metavar="MODULE_OR_REF",
        help="a .wasm (or .wat) file, or a module to pull first as `sidecar wasm pull` does: an image "
        "reference (host/repo:tag, @sha256:...) or an https:// URL; pulled modules are verified and cached",
    )
    wasm_fetch.add_reference_args(run)
    run.add_argument("--config", default="", help="plugin configuration: a JSON string or @file")
    run.add_argument("--vm-config", default="", help="VM configuration: a string or @file")
    run.add_argument("--root-id", default="", help="root_id of the plugin (selects the root context)")
    run.add_argument("--name", default="", help="the plugin's name (property plugin_name)")
    run.add_argument("--method", default="GET")
    run.add_argument("--path", default="/")
    run.add_argument("--authority", default="example.com")
    run.add_argument("--header", action="append", default=[], metavar="K:V", help="request header (repeatable)")
    run.add_argument("--body", default="", help="request body: a string or @file")
    run.add_argument("--response-status", type=int, default=200, help="the upstream's status (default 200)")
    run.add_argument("--response-header", action="append", default=[], metavar="K:V", help="upstream header")
    run.add_argument("--response-body", default="", help="the upstream's body: a string or @file")
    run.add_argument(
        "--callout-status",
        type=int,
        default=None,
        help="answer the module's HTTP callouts with this status (default: Envoy's reply for an unreachable "
        "cluster, see --callout-failure)",
    )
    run.add_argument("--callout-body", default="", help="body of callout answers: a string or @file")
    run.add_argument(
        "--callout-failure",
        choices=["connect-failure", "timeout", "reset"],
        default="connect-failure",
        help="without --callout-status, how callouts fail: Envoy's 503 'upstream connect error' (default), "
        "its 504 'upstream request timeout', or a reset (no response at all)",
    )
    run.add_argument(
        "--cluster",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="make callouts to cluster NAME for real, to HOST:PORT (repeatable); callouts to clusters not "
        "listed are then refused as Envoy refuses unknown clusters",
    )
    run.add_argument(
        "--upstream",
        default=None,
        metavar="HOST:PORT",
        help="send the request to this real HTTP/1.1 upstream instead of the canned --response-* answer",
    )
    run.add_argument(
        "--route-timeout", type=float, default=15.0, help="with --upstream: Envoy's route timeout (default 15s)"
    )
    run.add_argument(
        "--framing",
        choices=["http1", "whole"],
        default="http1",
        help="how bodies reach the module: as Envoy does for HTTP/1 (data, then an empty end-of-stream "
        "call; the default) or whole in one end-of-stream call",
    )
    run.add_argument("--property", action="append", default=[], metavar="K=V", help="property, e.g. route_name=r1")
    run.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable for WASI")
    run.add_argument("--chunk-size", type=int, default=None, help="split bodies into chunks of this many bytes")
    run.add_argument("--timeout", type=float, default=5.0, help="deadline per callback in seconds (default 5)")
    run.add_argument("--memory-mb", type=int, default=512, help="memory limit in MiB (default 512)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    run.set_defaults(func=_run)


def _value(text: str, what: str) -> bytes:
    if not text.startswith("@"):
        return text.encode()
    try:
        return Path(text[1:]).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {text[1:]}: {exc.strerror}") from None


def _pair(text: str, sep: str, what: str) -> tuple[str, str]:
    # Pseudo-headers (":path:/x") keep their leading colon.
    lead = ":" if sep == ":" and text.startswith(":") else ""
    name, found, value = text[len(lead) :].partition(sep)
    if not found or not name.strip():
        raise ConfigError(f"{what} {text!r} is not in the form NAME{sep}VALUE")
    if sep == ":":
        return lead + name.strip().lower(), value.strip()
    return name.strip(), value


def _module_path(args: argparse.Namespace) -> Path:
    """A local file as given; a reference or URL is pulled first (verified, cached) and run from the cache."""
    from sidecar.wasm.host.errors import WasmLoadError

    ref: str = args.module
    path = Path(ref)
    if path.exists():
        return path
    if _is_reference(ref):
        return wasm_fetch.pull_reference(args, ref)
    raise WasmLoadError(f"{ref}: no such file")


def _is_reference(text: str) -> bool:
    """`https://...`, `oci://...`, `host.tld/repo:tag`, `localhost:5000/repo`, `repo@sha256:...`; not a path."""
    if "://" in text or "@sha256:" in text:
        return True
    if text.startswith(("/", ".", "~")) or "/" not in text or text.endswith((".wasm", ".wat")):
        return False
    first = text.split("/", 1)[0]
    return "." in first or ":" in first or first == "localhost"


def _run(args: argparse.Namespace) -> int:
    from sidecar.wasm.host.exchange import Request, Response, run_exchange
    from sidecar.wasm.host.plugin import Plugin
    from sidecar.wasm.host.state import HttpCallResponse
    from sidecar.wasm.host.upstream import HttpUpstream, cluster_responder
    from sidecar.wasm.host.vm import Limits

    callout_body = _value(args.callout_body, "--callout-body")
    clusters = dict(_pair(c, "=", "--cluster") for c in args.cluster)
    real_callouts = cluster_responder(clusters) if clusters else None

    def responder(call: HttpCall) -> HttpCallResponse | None:
        if real_callouts is not None and call.upstream in clusters:
            return real_callouts(call)
        if args.callout_status is not None:
            return HttpCallResponse.of(args.callout_status, callout_body)
        if args.callout_failure == "timeout":
            return HttpCallResponse.timeout()
        return HttpCallResponse.connect_failure() if args.callout_failure == "connect-failure" else None

    plugin = Plugin(
        _module_path(args),
        configuration=_value(args.config, "--config"),
        vm_configuration=_value(args.vm_config, "--vm-config"),
        name=args.name,
        root_id=args.root_id,
        properties=dict(_pair(p, "=", "--property") for p in args.property),
        environment=dict(_pair(e, "=", "--env") for e in args.env),
        limits=Limits(call_timeout_s=args.timeout, memory_bytes=args.memory_mb << 20),
        http_responder=responder,
        clusters=clusters or None,
    )
    try:
        plugin.start()
        request = Request(
            args.method,
            args.path,
            [_pair(h, ":", "--header") for h in args.header],
            _value(args.body, "--body"),
            authority=args.authority,
        )
        upstream_headers = [_pair(h, ":", "--response-header") for h in args.response_header]
        canned = Response(args.response_status, upstream_headers, _value(args.response_body, "--response-body"))
        if args.upstream is not None:
            real = HttpUpstream(args.upstream, timeout_s=args.route_timeout)
            exchange = run_exchange(
                plugin, request, real, chunk_size=args.chunk_size, framing=args.framing, upstream_address=args.upstream
            )
        else:
            exchange = run_exchange(plugin, request, canned, chunk_size=args.chunk_size, framing=args.framing)
    finally:
        logs = [(r.level.name.lower(), r.message) for r in plugin.log_records]
    report = _report(plugin, exchange, logs)
    for warning in exchange.warnings:
        # Loudly: this is what a local test host is for (Envoy would do it silently).
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0


def _text(body: bytes) -> str:
    return body.decode(errors="replace")


def _report(plugin: Plugin, exchange: Exchange, logs: list[tuple[str, str]]) -> dict[str, Any]:
    up = exchange.upstream_request
    resp = exchange.response
    local = exchange.local_response
    return {
        "module": plugin.name,
        "abi": plugin.abi_version,
        "actions": [{"phase": phase, "action": action.name} for phase, action in exchange.actions],
        "upstream_request": None if up is None else {"headers": up.headers, "body": _text(up.body)},
        "response": None
        if resp is None
        else {"status": resp.status, "headers": resp.headers, "body": _text(resp.body)},
        "local_response": None
        if local is None
        else {
            "status": local.status,
            "details": local.details,
            "headers": local.headers,
            "body": _text(local.body),
            "grpc_status": local.grpc_status,
        },
        "stalled": exchange.stalled,
        "warnings": exchange.warnings,
        "closed": exchange.closed,
        "metrics": plugin.metrics,
        "logs": [{"level": level, "message": message} for level, message in logs],
    }


def _print_text(report: dict[str, Any]) -> None:
    out = sys.stdout.write
    out(f"module {report['module']} (proxy-wasm ABI {report['abi']})\n")
    for warning in report["warnings"]:
        out(f"\nWARNING: {warning}\n")
    out("\nphases:\n")
    for item in report["actions"]:
        out(f"  {item['phase']:<18} {item['action']}\n")
    if report["stalled"]:
        out(f"  stalled in {report['stalled']}: paused and never resumed (Envoy would time out)\n")
    if report["closed"]:
        out("  the module closed the stream (Envoy resets it)\n")
    if report["local_response"]:
        local = report["local_response"]
        out(f"\nlocal response sent by the module: {local['status']} ({local['details']})\n")
    for title, part in (
        ("upstream request", report["upstream_request"]),
        ("response to client", report["response"]),
    ):
        if part is None:
            continue
        status = f" {part['status']}" if "status" in part else ""
        out(f"\n{title}:{status}\n")
        for k, v in part["headers"]:
            out(f"  {k}: {v}\n")
        if part["body"]:
            body = part["body"]
            out(f"  body ({len(body)} chars): {body[:_BODY_PREVIEW]}{'...' * (len(body) > _BODY_PREVIEW)}\n")
    if report["metrics"]:
        out("\nmetrics:\n" + "".join(f"  {k} = {v}\n" for k, v in report["metrics"].items()))
    if report["logs"]:
        out("\nlogs:\n" + "".join(f"  [{r['level']}] {r['message']}\n" for r in report["logs"]))
