"""Plugin discovery, chains, and the Envoy `processing_mode` each chain needs.

Plugins are found, in this order, by:
  * an entry point in the group `sidecar.plugins` (`use: header-stamp`);
  * a `module:attr` string (`use: mycompany.plugins:Redact`).
Nothing registers itself at import time.

A chain's processing mode follows from the hooks its plugins define: a phase no plugin handles is a
phase Envoy is told to skip. The Envoy filter is configured with the union over all chains; a request
whose chain needs less gets a `mode_override` on its request-headers answer.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

from sidecar.config import DEFAULT_CHAIN, ChainSpec, PluginSpec
from sidecar.errors import ConfigError, PluginLoadError
from sidecar.plugins import BodyMode, Plugin

__all__ = ["PHASES", "Chain", "Hook", "Registry", "load_plugin_class"]

ENTRY_POINT_GROUP = "sidecar.plugins"
CHAIN_METADATA_KEY = "x-sidecar-chain"

PHASES = (
    "request_headers", "request_body", "request_trailers",
    "response_headers", "response_body", "response_trailers",
)  # fmt: skip
_SUPPORTED_BODY_MODES = (BodyMode.BUFFERED,)

ProcessingMode = processing_mode_pb2.ProcessingMode
SEND = ProcessingMode.SEND
SKIP = ProcessingMode.SKIP


@dataclass(frozen=True, slots=True)
class Hook:
    """One plugin's handler for one phase, with sync/async decided once at load time."""

    plugin: str
    func: Callable[..., Any]
    is_async: bool

    async def __call__(self, *args: Any) -> Any:
        if self.is_async:
            return await self.func(*args)
        return self.func(*args)


def load_plugin_class(use: str) -> type[Plugin]:
    """Resolve an entry point name or a `module:attr` string to a Plugin subclass."""
    if ":" in use:
        module_name, _, attr = use.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginLoadError(f"plugin {use!r}: cannot import module {module_name!r}: {exc}") from None
        except Exception as exc:
            raise PluginLoadError(
                f"plugin {use!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from None
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise PluginLoadError(f"plugin {use!r}: module {module_name!r} has no attribute {attr!r}")
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == use]
        if not found:
            known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
            raise PluginLoadError(
                f"unknown plugin {use!r}: not an installed entry point ({', '.join(known) or 'none installed'})"
                " nor a module:attr string"
            )
        try:
            obj = found[0].load()
        except Exception as exc:
            raise PluginLoadError(f"plugin {use!r}: loading entry point failed: {type(exc).__name__}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        raise PluginLoadError(f"plugin {use!r}: {obj!r} is not a subclass of sidecar.Plugin")
    return obj


def _instantiate(spec: PluginSpec) -> Plugin:
    cls = load_plugin_class(spec.use)
    try:
        return cls(spec.config)
    except Exception as exc:
        # A plugin rejecting its config is a user error: say which plugin and why.
        raise PluginLoadError(f"plugin {spec.use!r}: invalid config: {exc}") from None


class Chain:
    """An ordered list of plugin instances plus what Envoy must send for them."""

    def __init__(self, name: str, plugins: Sequence[Plugin], on_error: str = "fail_closed") -> None:
        if not plugins:
            raise ConfigError(f"chain {name!r} has no plugins")
        self.name = name
        self.plugins = tuple(plugins)
        self.fail_open = on_error == "fail_open"
        self.hooks: dict[str, tuple[Hook, ...]] = {}
        for phase in PHASES:
            ordered = self.plugins if phase.startswith("request") else tuple(reversed(self.plugins))
            self.hooks[phase] = tuple(
                Hook(p.display_name(), fn, inspect.iscoroutinefunction(fn))
                for p in ordered
                if (fn := getattr(p, "on_" + phase, None)) is not None
            )
        self.request_body_mode = self._body_mode("request")
        self.response_body_mode = self._body_mode("response")
        self.mode = ProcessingMode(
            request_header_mode=SEND,
            # Body hooks get the headers too: plugins look at content-type, and the server keeps
            # content-length right when a buffered body changes size.
            response_header_mode=SEND if self.hooks["response_headers"] or self.response_body_mode else SKIP,
            request_body_mode=self.request_body_mode,
            response_body_mode=self.response_body_mode,
            request_trailer_mode=SEND if self.hooks["request_trailers"] else SKIP,
            response_trailer_mode=SEND if self.hooks["response_trailers"] else SKIP,
        )

    def _body_mode(self, direction: str) -> int:
        users = [p for p in self.plugins if getattr(p, f"on_{direction}_body", None) is not None]
        modes = {BodyMode(getattr(p, f"{direction}_body")) for p in users}
        if not modes:
            return BodyMode.NONE
        if len(modes) > 1:
            listing = ", ".join(f"{p.display_name()}={BodyMode(getattr(p, f'{direction}_body')).name}" for p in users)
            raise ConfigError(f"chain {self.name!r}: {direction} body hooks need different body modes ({listing})")
        (mode,) = modes
        if mode not in _SUPPORTED_BODY_MODES:
            raise ConfigError(
                f"chain {self.name!r}: {direction}_body mode {mode.name} is not supported yet "
                f"(supported: {', '.join(m.name for m in _SUPPORTED_BODY_MODES)})"
            )
        return int(mode)

    def describe_mode(self) -> dict[str, str]:
        return describe_mode(self.mode)


def describe_mode(mode: Any) -> dict[str, str]:
    header = processing_mode_pb2.ProcessingMode.HeaderSendMode
    body = processing_mode_pb2.ProcessingMode.BodySendMode
    return {
        "request_header_mode": header.Name(mode.request_header_mode),
        "response_header_mode": header.Name(mode.response_header_mode),
        "request_body_mode": body.Name(mode.request_body_mode),
        "response_body_mode": body.Name(mode.response_body_mode),
        "request_trailer_mode": header.Name(mode.request_trailer_mode),
        "response_trailer_mode": header.Name(mode.response_trailer_mode),
    }


class Registry:
    """All chains of one sidecar, and the processing mode the Envoy filter must be configured with."""

    def __init__(self, chains: Iterable[Chain], default: str = DEFAULT_CHAIN) -> None:
        self.chains = {chain.name: chain for chain in chains}
        if not self.chains:
            raise ConfigError("no plugins configured: give a config file with `plugins:` or `chains:`, or --plugin")
        self.default = self.chains.get(default) or next(iter(self.chains.values()))
        self.mode = _union(chain.mode for chain in self.chains.values())

    @classmethod
    def from_specs(cls, specs: Iterable[ChainSpec]) -> Registry:
        return cls(Chain(s.name, [_instantiate(p) for p in s.plugins], s.on_error) for s in specs)

    def chain(self, name: str | None) -> Chain | None:
        return self.default if name is None else self.chains.get(name)


def _union(modes: Iterable[Any]) -> Any:
    union = ProcessingMode(request_header_mode=SEND, response_header_mode=SKIP,
                           request_trailer_mode=SKIP, response_trailer_mode=SKIP)  # fmt: skip
    for mode in modes:
        for fld in ("response_header_mode", "request_trailer_mode", "response_trailer_mode"):
            if getattr(mode, fld) == SEND:
                setattr(union, fld, SEND)
        union.request_body_mode = max(union.request_body_mode, mode.request_body_mode)
        union.response_body_mode = max(union.response_body_mode, mode.response_body_mode)
    return union

