"""What Envoy's ext_proc filter was configured with, checked against the plugins at `sidecar serve` start.

The chart (and anyone who writes Envoy's config by hand) hands in what Envoy was given: the processing
mode, the metadata namespaces it accepts and forwards, the attributes it sends. Envoy silently drops
what its config does not name, so a plugin whose hook or declaration Envoy does not serve would sit
silent while traffic passes unprocessed; instead the sidecar refuses to start, in one line naming the
plugin, what it needs and the setting (and Helm value) to change. Each flag is checked only when given.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.errors import ConfigError

if TYPE_CHECKING:
    from sidecar.chains import Chain, Registry

__all__ = ["add_envoy_args", "check_envoy", "declarations", "hook_listing"]


@dataclass(frozen=True)
class _Grant:
    """One list of names Envoy's ext_proc config grants, and the plugin declaration it must cover."""

    flag: str
    declaration: str  # the Plugin attribute (`sidecar.chains.DECLARATIONS`)
    what: str  # what Envoy does with a name on the list ({s}: a plural's s)
    envoy_field: str
    helm_value: str


_GRANTS = (
    _Grant(
        "--envoy-receiving-namespaces",
        "metadata_namespaces",
        "accept dynamic metadata from the sidecar in",
        "metadata_options.receiving_namespaces",
        "extProc.metadata.writableNamespaces",
    ),
    _Grant(
        "--envoy-forwarding-namespaces",
        "forwarding_namespaces",
        "forward dynamic metadata to the sidecar from",
        "metadata_options.forwarding_namespaces",
        "extProc.metadata.accessibleNamespaces",
    ),
    _Grant(
        "--envoy-request-attributes",
        "request_attributes",
        "send the request attribute{s}",
        "request_attributes",
        "extProc.processingMode.request.attributes",
    ),
    _Grant(
        "--envoy-response-attributes",
        "response_attributes",
        "send the response attribute{s}",
        "response_attributes",
        "extProc.processingMode.response.attributes",
    ),
)

#: Missing names listed in the one line before "and N more" (the line stays readable, the count honest).
_LISTED_MAX = 8


def add_envoy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--envoy-processing-mode",
        metavar="FIELD=MODE,...",
        help="the processing_mode Envoy's ext_proc filter was configured with (e.g. request_body_mode=BUFFERED; "
        "unset fields are Envoy's defaults): refuse to start, in one line, when the plugins need more",
    )
    for grant in _GRANTS:
        parser.add_argument(
            grant.flag,
            metavar="NAME,...",
            help=f"the ext_proc filter's {grant.envoy_field} (empty: none): refuse to start when a plugin's "
            f"{grant.declaration} names one Envoy was not given",
        )


def check_envoy(registry: Registry, args: argparse.Namespace) -> None:
    """Every `--envoy-*` flag given, against what the registry's plugins need; a ConfigError names the first gap."""
    if args.envoy_processing_mode is not None:
        _check_mode(registry, args.envoy_processing_mode)
    for grant in _GRANTS:
        spec = getattr(args, grant.flag.removeprefix("--").replace("-", "_"))
        if spec is not None:
            _check_grant(registry, grant, spec)


def declarations(chain: Chain) -> dict[str, list[str]]:
    """What the chain's plugins declare, each name once (`sidecar plugins`: what to give Envoy, or the chart)."""
    return {
        grant.declaration: list(dict.fromkeys(name for p in chain.plugins for name in getattr(p, grant.declaration)))
        for grant in _GRANTS
    }


def _check_grant(registry: Registry, grant: _Grant, spec: str) -> None:
    granted = {name.strip() for name in spec.split(",")} - {""}
    missing = [name for name in getattr(registry, grant.declaration) if name not in granted]
    if not missing:
        return
    listed = ", ".join(f"{name!r} ({_declarers(registry, grant.declaration, name)})" for name in missing[:_LISTED_MAX])
    more = f" and {len(missing) - _LISTED_MAX} more" if len(missing) > _LISTED_MAX else ""
    raise ConfigError(
        f"{grant.flag}: Envoy's ext_proc filter does not {grant.what.format(s='s' if len(missing) > 1 else '')} "
        f"{listed}{more}; add "
        f"{'it' if len(missing) == 1 else 'them'} to Envoy's {grant.envoy_field} (Helm: {grant.helm_value}), "
        "or change the plugins"
    )


def _declarers(registry: Registry, declaration: str, name: str) -> str:
    """`plugin 'audit' declares it in metadata_namespaces, chain 'default'`: who needs `name`."""
    from sidecar.wire import METADATA_NAMESPACE

    if declaration == "metadata_namespaces" and name == METADATA_NAMESPACE:
        return "the sidecar's own namespace, where ctx.set_metadata writes by default"
    who = [
        f"plugin {chain.labels[id(plugin)]!r} in chain {chain.name!r}"
        for chain in registry.chains.values()
        for plugin in chain.plugins
        if name in getattr(plugin, declaration)
    ]
    return f"{declaration} of {', '.join(who)}"


# ---- the processing mode -------------------------------------------------------------------------

#: What Envoy sends when a field of its processing_mode is not set (ext_proc's own defaults).
_ENVOY_MODE_DEFAULTS = {
    "request_header_mode": "SEND",
    "response_header_mode": "SEND",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP",
    "request_body_mode": "NONE",
    "response_body_mode": "NONE",
}
_HEADER_MODES = ("SEND", "SKIP")
_BODY_MODES = ("NONE", "STREAMED", "BUFFERED", "BUFFERED_PARTIAL", "FULL_DUPLEX_STREAMED")


def _parse_mode(spec: str) -> dict[str, str]:
    mode = dict(_ENVOY_MODE_DEFAULTS)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        field, _, value = item.partition("=")
        if field not in mode:
            raise ConfigError(
                f"--envoy-processing-mode: unknown field {field!r}; expected FIELD=VALUE with FIELD one of "
                + ", ".join(_ENVOY_MODE_DEFAULTS)
            )
        allowed = _BODY_MODES if field.endswith("_body_mode") else _HEADER_MODES
        if value not in allowed:
            raise ConfigError(f"--envoy-processing-mode: {field}={value!r}; expected one of {', '.join(allowed)}")
        mode[field] = value
    return mode


def _check_mode(registry: Registry, spec: str) -> None:
    """Refuse to serve when Envoy was configured to send less than the chains' hooks need.

    A body mode must be the one the chains need (a whole-body hook fed chunks, or the reverse, is not the
    same program), NONE included: the sidecar answers a body its mode says Envoy never sends as a protocol
    error, so every request with a body would fail. Headers and trailers the chains need must be sent;
    sending more of those is fine: the sidecar answers them.
    """
    from sidecar.chains import describe_mode

    configured = _parse_mode(spec)
    needed = describe_mode(registry.mode)
    for field, want in needed.items():
        have = configured[field]
        if field.endswith("_body_mode") and want == "NONE" and have != "NONE":
            raise ConfigError(
                f"--envoy-processing-mode: Envoy is configured with {field}={have}, but no plugin reads that body, "
                "and the sidecar would answer every one with an error; set it to NONE (Helm: "
                "extProc.processingMode), or add a plugin that reads it"
            )
        unmet = have != want if field.endswith("_body_mode") else (want == "SEND" and have == "SKIP")
        if unmet:
            raise ConfigError(
                f"--envoy-processing-mode: Envoy is configured with {field}={have}, but the plugins need {want} "
                f"({_needing(registry, field, want)}); give Envoy that mode (Helm: extProc.processingMode), "
                "or change the plugins"
            )


def _needing(registry: Registry, field: str, want: str) -> str:
    """`chain 'default': json-redact, body-digest`: who needs `want` for that processing_mode field."""
    direction, kind = field.split("_")[:2]
    kinds = {"header": ("headers", "body", "chunk", "stream"), "body": ("body", "chunk", "stream")}
    parts = []
    for name, chain in registry.chains.items():
        if chain.describe_mode()[field] != want:
            continue
        hooks = hook_listing(chain)
        phases = [f"{direction}_{k}" for k in kinds.get(kind, ("trailers", "stream"))]
        plugins = dict.fromkeys(p for phase in phases for p in hooks.get(phase, []))
        parts.append(f"chain {name!r}: {', '.join(plugins)}" if plugins else f"chain {name!r}")
    return "; ".join(parts)


def hook_listing(chain: Chain) -> dict[str, list[str]]:
    """Each hook kind the chain's plugins define, `request_chunk` and `response_stream` included, in call order."""
    from sidecar.chains import BODY_KINDS, HOOK_KINDS

    listing: dict[str, list[str]] = {}
    for direction in ("request", "response"):
        for kind in HOOK_KINDS:
            if kind in BODY_KINDS:
                plugins = [stage.plugin for stage in chain.body_stages[direction] if stage.kind == kind]
            else:
                plugins = [hook.plugin for hook in chain.hooks[f"{direction}_{kind}"]]
            if plugins:
                listing[f"{direction}_{kind}"] = plugins
    return listing
