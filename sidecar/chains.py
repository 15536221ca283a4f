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

import dataclasses
import difflib
import importlib
import inspect
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

from sidecar.config import (
    DEFAULT_CHAIN,
    ChainSpec,
    PluginSpec,
    SidecarConfig,
    load_config,
    parse_host_port,
    parse_socket_mode,
)
from sidecar.errors import ConfigError, PluginLoadError
from sidecar.plugins import BodyMode, Plugin, describe
from sidecar.wire import METADATA_NAMESPACE, PHASES

__all__ = ["BodyStage", "Chain", "Hook", "Registry", "check_plugin", "load_plugin_class", "load_sidecar"]

ENTRY_POINT_GROUP = "sidecar.plugins"

ProcessingMode = processing_mode_pb2.ProcessingMode
SEND = ProcessingMode.SEND
SKIP = ProcessingMode.SKIP
FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED


#: The hooks a plugin may define, per direction, and the arguments each takes after `ctx`.
HOOK_KINDS = {
    "headers": ("headers",),
    "body": ("body",),
    "chunk": ("chunk", "end_of_stream"),
    "stream": ("chunks",),
    "trailers": ("trailers",),
}
HOOK_NAMES = tuple(f"on_{direction}_{kind}" for direction in ("request", "response") for kind in HOOK_KINDS)
BODY_KINDS = ("body", "chunk", "stream")

#: What each kind of hook may return (see docs/plugins.md); anything else is that plugin's error.
EXPECTED = {
    "headers": "None or a Respond instance",
    "trailers": "None",
    "body": "None, bytes, str or a Respond instance",
    "chunk": "None, bytes, str or a Respond instance",
    "stream": "an async generator yielding bytes or str",
}
# Envoy lets trailers and (in a FULL_DUPLEX_STREAMED body) chunks go on as they come: no Respond there.
EXPECTED_IN_STREAM = "None, bytes or str (a Respond is not possible once a streamed body is under way)"


@dataclass(frozen=True, slots=True)
class Hook:
    """One plugin's handler for one phase, with sync/async decided once at load time."""

    plugin: str
    func: Callable[..., Any]
    is_async: bool
    #: The hook's method name (`on_request_headers`), for errors.
    name: str = ""

    async def __call__(self, *args: Any) -> Any:
        if self.is_async:
            return await self.func(*args)
        return self.func(*args)

    def wrong(self, result: Any, expected: str | None = None, verb: str = "returned") -> TypeError:
        """The error for a result that breaks this hook's contract (closing a stray coroutine)."""
        kind = self.name.rsplit("_", 1)[-1]
        return TypeError(f"{self.name} {verb} {describe(result)}; expected {expected or EXPECTED[kind]}")


def _is_async(func: Callable[..., Any]) -> bool:
    """`async def`, also behind a decorator (functools.wraps) or as an object's `async def __call__`."""
    return (
        inspect.iscoroutinefunction(func)
        or inspect.iscoroutinefunction(inspect.unwrap(func))
        or (not inspect.isroutine(func) and inspect.iscoroutinefunction(type(func).__call__))
    )


def _hook(plugin: Plugin, name: str, label: str) -> Hook | None:
    func = getattr(plugin, name, None)
    return None if func is None else Hook(label, func, _is_async(func), name)


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


def check_plugin(plugin: Plugin) -> None:
    """Check a plugin instance against the hook contract; a PluginLoadError names its class and the problem.

    Caught here, at start-up, rather than on every request: a misspelled hook (which would silently be a
    plugin that does nothing), a hook that cannot take (ctx, value), a generator where a value is
    returned, a body mode no hook uses, a plugin with no hook at all.
    """
    cls = type(plugin)
    where = f"plugin {plugin.display_name()!r} ({cls.__module__}:{cls.__qualname__})"
    if not isinstance(cls.name, str):
        raise PluginLoadError(f"{where}: name must be a str, got {describe(cls.name)}")
    if not isinstance(cls.observe_only, bool):
        raise PluginLoadError(f"{where}: observe_only must be True or False, got {describe(cls.observe_only)}")
    for declaration in DECLARATIONS:
        problem = _declaration_problem(declaration, getattr(plugin, declaration))
        if problem:
            raise PluginLoadError(f"{where}: {problem}")
    for attr in dir(plugin):
        if attr not in HOOK_NAMES and _looks_like_hook(attr):
            raise PluginLoadError(f"{where}: {_unknown_hook(attr)}")
    defined = [name for name in HOOK_NAMES if getattr(plugin, name, None) is not None]
    if not defined:
        raise PluginLoadError(
            f"{where}: defines no hook; a plugin needs at least one of on_request_headers, on_request_body, "
            "on_request_chunk, on_request_stream, on_request_trailers (or the on_response_ ones)"
        )
    for name in defined:
        problem = _hook_problem(name, getattr(plugin, name))
        if problem:
            raise PluginLoadError(f"{where}: {problem}")
    for direction in ("request", "response"):
        problem = _body_problem(plugin, direction)
        if problem:
            raise PluginLoadError(f"{where}: {problem}")


#: What a plugin declares it needs from Envoy: tuples of names every generated config asks Envoy for.
DECLARATIONS = ("metadata_namespaces", "forwarding_namespaces", "request_attributes", "response_attributes")
# A metadata namespace or an attribute (`request.path`, `source.address`, `xds.route_name`...): printable,
# no spaces, bounded. Envoy reads the names from its config; a name it cannot use fails Envoy's start.
_DECLARED_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "._-/:[]'\"")
# A namespace goes into %DYNAMIC_METADATA(namespace)% of the access log, where ':' splits a namespace
# from a key (and the others end or quote the name): attributes keep them (`request.headers['x']`).
_NAMESPACE_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "._-/")
_NAMESPACE_DECLARATIONS = ("metadata_namespaces", "forwarding_namespaces")
_DECLARED_NAME_MAX = 256
_DECLARED_MAX = 64


def _declaration_problem(declaration: str, value: Any) -> str | None:
    expected = f"{declaration} must be a tuple of names"
    # Not a set: its order changes from run to run, and so would every generated config.
    if not isinstance(value, tuple | list):
        return f'{expected} (e.g. ("a.b",)), got {describe(value)}'
    if len(value) > _DECLARED_MAX:
        return f"{expected}: at most {_DECLARED_MAX}, got {len(value)}"
    for name in value:
        if not isinstance(name, str):
            return f"{expected}, got an item {describe(name)}"
        namespace = declaration in _NAMESPACE_DECLARATIONS
        allowed, shown = (_NAMESPACE_NAME_CHARS, "._-/") if namespace else (_DECLARED_NAME_CHARS, "._-/:[]'\"")
        if not name or len(name) > _DECLARED_NAME_MAX or not allowed.issuperset(name):
            return (
                f"{declaration}: {name[:_DECLARED_NAME_MAX]!r} is not a name (1 to {_DECLARED_NAME_MAX} letters, "
                f"digits and {shown})"
            )
    return None


def _declared_names(declarers: Iterable[Any], declaration: str, first: Sequence[str] = ()) -> tuple[str, ...]:
    """The names plugins (or chains) declare, once each, in order (`first` ahead)."""
    names = dict.fromkeys(first)
    for declarer in declarers:
        names.update(dict.fromkeys(getattr(declarer, declaration)))
    return tuple(names)


_HOOK_KEYS = {name.replace("_", ""): name for name in HOOK_NAMES}


def _looks_like_hook(attr: str) -> bool:
    """`on_anything`, or a hook's name in another spelling (`onRequestHeaders`, `On_Request_Headers`)."""
    lowered = attr.lower()
    return lowered.startswith("on_") or lowered.replace("_", "") in _HOOK_KEYS


def _unknown_hook(attr: str) -> str:
    exact = _HOOK_KEYS.get(attr.lower().replace("_", ""))
    close = [exact] if exact else difflib.get_close_matches(attr.lower(), HOOK_NAMES, n=1, cutoff=0.6)
    hint = (
        f"did you mean {close[0]}?"
        if close
        else "names starting with on_ are hooks, and the hooks are "
        + ("on_request_* and on_response_* with headers, body, chunk, stream or trailers")
    )
    return f"unknown hook {attr}: {hint}"


def _hook_problem(name: str, func: Any) -> str | None:
    kind = name.rsplit("_", 1)[-1]
    args = HOOK_KINDS[kind]
    call = f"{name}(ctx, {', '.join(args)})"
    if not callable(func):
        return f"{name} must be a method (or None to drop the hook), got {describe(func)}"
    if kind == "stream":
        if not inspect.isasyncgenfunction(func):
            return f"{name} must be an async generator (async def ... with yield), as Envoy calls it {call}"
    elif inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        return f"{name} yields, but only on_*_stream hooks may: return {EXPECTED[kind]} instead"
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return None
    try:
        signature.bind(*range(len(args) + 1))
    except TypeError:
        return f"{name}({_parameters(signature)}) cannot be called as {call}"
    return None


def _parameters(signature: inspect.Signature) -> str:
    """The parameter list as written, without annotations: `headers`, `ctx, *, strict`."""
    shown: list[str] = []
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY and not any(s.startswith("*") for s in shown):
            shown.append("*")
        prefix = "*" if parameter.kind is parameter.VAR_POSITIONAL else ""
        prefix = "**" if parameter.kind is parameter.VAR_KEYWORD else prefix
        default = "" if parameter.default is parameter.empty else "=..."
        shown.append(f"{prefix}{parameter.name}{default}")
    return ", ".join(shown)


def _body_problem(plugin: Plugin, direction: str) -> str | None:
    kinds = [kind for kind in BODY_KINDS if getattr(plugin, f"on_{direction}_{kind}", None) is not None]
    if len(kinds) > 1:
        return f"defines {', '.join(f'on_{direction}_{kind}' for kind in kinds)}: pick one per direction"
    declared = getattr(plugin, f"{direction}_body", None)
    if declared is None:
        return None
    if isinstance(declared, bool) or not isinstance(declared, int) or declared not in set(BodyMode):
        return f"{direction}_body must be a BodyMode, got {describe(declared)}"
    mode = BodyMode(declared)
    if not kinds:
        # The class's hooks count: an instance may drop a hook for its configuration (set it to None).
        if any(getattr(type(plugin), f"on_{direction}_{kind}", None) is not None for kind in BODY_KINDS):
            return None
        return (
            f"{direction}_body = {mode.name} but no {direction} body hook uses it "
            f"(on_{direction}_body, on_{direction}_chunk or on_{direction}_stream)"
        )
    if mode not in _ALLOWED_MODES[kinds[0]]:
        allowed = ", ".join(sorted(m.name for m in _ALLOWED_MODES[kinds[0]]))
        return f"{direction}_body = {mode.name} does not fit on_{direction}_{kinds[0]} (it works with {allowed})"
    return None


@dataclass(frozen=True, slots=True)
class BodyStage:
    """One plugin's body handler in a chain's body pipeline."""

    plugin: str
    kind: str  # "body" (whole body), "chunk" (per chunk) or "stream" (async iterator in, out)
    hook: Hook


_DEFAULT_MODE = {"body": BodyMode.BUFFERED, "chunk": BodyMode.STREAMED, "stream": BodyMode.FULL_DUPLEX_STREAMED}
_ALLOWED_MODES = {
    "body": {BodyMode.BUFFERED},
    "chunk": {BodyMode.STREAMED, BodyMode.BUFFERED_PARTIAL, BodyMode.FULL_DUPLEX_STREAMED},
    "stream": {BodyMode.FULL_DUPLEX_STREAMED},
}


class Chain:
    """An ordered list of plugin instances plus what Envoy must send for them."""

    def __init__(self, name: str, plugins: Sequence[Plugin], on_error: str = "fail_closed") -> None:
        if not plugins:
            raise ConfigError(f"chain {name!r} has no plugins")
        for plugin in plugins:
            check_plugin(plugin)
        self.name = name
        self.plugins = tuple(plugins)
        self.fail_open = on_error == "fail_open"
        # One label per plugin instance, so the same class twice (with two configs) stays two plugins for
        # body modes, fail_open bypasses and logs: "name", then "name#2", "name#3"...
        self.labels: dict[int, str] = {}
        counts: dict[str, int] = {}
        for plugin in self.plugins:
            base = plugin.display_name()
            counts[base] = counts.get(base, 0) + 1
            self.labels[id(plugin)] = base if counts[base] == 1 else f"{base}#{counts[base]}"
        self.hooks: dict[str, tuple[Hook, ...]] = {}
        for phase in PHASES:
            self.hooks[phase] = tuple(
                hook for p in self._ordered(phase) if (hook := _hook(p, "on_" + phase, self.labels[id(p)])) is not None
            )
        self.body_stages = {d: self._body_stages(d) for d in ("request", "response")}
        #: What the plugins declared (see `DECLARATIONS`); the sidecar's own namespace is always writable.
        self.metadata_namespaces = _declared_names(self.plugins, "metadata_namespaces", (METADATA_NAMESPACE,))
        self.writable_namespaces = frozenset(self.metadata_namespaces)  # what ctx.set_metadata checks
        self.forwarding_namespaces = _declared_names(self.plugins, "forwarding_namespaces")
        self.request_attributes = _declared_names(self.plugins, "request_attributes")
        self.response_attributes = _declared_names(self.plugins, "response_attributes")
        self.request_body_mode = self._body_mode("request")
        self.response_body_mode = self._body_mode("response")
        self.full_duplex = BodyMode.FULL_DUPLEX_STREAMED in (self.request_body_mode, self.response_body_mode)
        if self.full_duplex and self.fail_open:
            raise ConfigError(
                f"chain {name!r}: FULL_DUPLEX_STREAMED bodies need on_error: fail_closed "
                "(Envoy cannot let a half-rewritten stream through)"
            )
        observers = {p.observe_only for p in self.plugins}
        if len(observers) > 1:
            raise ConfigError(f"chain {name!r}: mixes observe-only plugins with plugins that change traffic")
        self.observe_only = observers == {True}
        if self.observe_only and self.full_duplex:
            raise ConfigError(f"chain {name!r}: observe-only plugins cannot use FULL_DUPLEX_STREAMED")
        fd_request = self.request_body_mode == BodyMode.FULL_DUPLEX_STREAMED
        fd_response = self.response_body_mode == BodyMode.FULL_DUPLEX_STREAMED
        self.mode = ProcessingMode(
            request_header_mode=SEND,
            # Body hooks get the headers too: plugins look at content-type, and the server keeps
            # content-length right when a buffered body changes size.
            response_header_mode=SEND if self.hooks["response_headers"] or self.response_body_mode else SKIP,
            request_body_mode=self.request_body_mode,
            response_body_mode=self.response_body_mode,
            # Envoy requires trailers SEND in a FULL_DUPLEX_STREAMED direction: they may end the body.
            request_trailer_mode=SEND if self.hooks["request_trailers"] or fd_request else SKIP,
            response_trailer_mode=SEND if self.hooks["response_trailers"] or fd_response else SKIP,
        )

    def _ordered(self, phase: str) -> tuple[Plugin, ...]:
        return self.plugins if phase.startswith("request") else tuple(reversed(self.plugins))

    def _body_stages(self, direction: str) -> tuple[BodyStage, ...]:
        # check_plugin made sure each plugin has at most one body hook per direction.
        return tuple(
            BodyStage(self.labels[id(plugin)], kind, hook)
            for plugin in self._ordered(direction)
            for kind in BODY_KINDS
            if (hook := _hook(plugin, f"on_{direction}_{kind}", self.labels[id(plugin)])) is not None
        )

    def _declared(self, direction: str, stage: BodyStage) -> BodyMode:
        plugin = next(p for p in self.plugins if self.labels[id(p)] == stage.plugin)
        declared = getattr(plugin, f"{direction}_body")
        return _DEFAULT_MODE[stage.kind] if declared is None else BodyMode(declared)  # checked by check_plugin

    def _body_mode(self, direction: str) -> int:
        stages = self.body_stages[direction]
        if not stages:
            return BodyMode.NONE
        modes = {s.plugin: self._declared(direction, s) for s in stages}
        kinds = {s.kind for s in stages}
        listing = ", ".join(f"{name}={mode.name}" for name, mode in modes.items())
        if BodyMode.FULL_DUPLEX_STREAMED in modes.values():
            if "body" in kinds:
                raise ConfigError(
                    f"chain {self.name!r}: {direction} body hooks cannot share a chain: a whole-body "
                    f"(BUFFERED) hook next to a FULL_DUPLEX_STREAMED one ({listing})"
                )
            return BodyMode.FULL_DUPLEX_STREAMED
        if "body" in kinds:
            return BodyMode.BUFFERED  # chunk hooks then see the whole body as one final chunk
        if len(set(modes.values())) > 1:
            raise ConfigError(f"chain {self.name!r}: {direction} body hooks need different body modes ({listing})")
        return int(next(iter(modes.values())))

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


@dataclass(frozen=True, slots=True)
class StreamPlan:
    mode_override: Any  # a ProcessingMode to send on the first answer, or None
    body_modes: tuple[int, int]  # what Envoy sends for this chain: (request, response)
    filter_body_modes: tuple[int, int]  # what the filter is configured with


class Registry:
    """All chains of one sidecar, and the processing mode the Envoy filter must be configured with."""

    def __init__(self, chains: Iterable[Chain], default: str = DEFAULT_CHAIN) -> None:
        self.chains = {chain.name: chain for chain in chains}
        if not self.chains:
            raise ConfigError("no plugins configured: give a config file with `plugins:` or `chains:`, or --plugin")
        self.default = self.chains.get(default) or next(iter(self.chains.values()))
        self.mode = _union(chain.mode for chain in self.chains.values())
        # Envoy ignores mode_override whenever the filter uses FULL_DUPLEX_STREAMED in either direction,
        # so then every chain gets everything the filter sends and answers the phases it does not hook.
        self.full_duplex = FULL_DUPLEX in (self.mode.request_body_mode, self.mode.response_body_mode)
        observing = {chain.observe_only for chain in self.chains.values()}
        if len(observing) > 1:
            raise ConfigError(
                "observe-only chains and chains that change traffic need separate sidecars "
                "(Envoy's observability_mode is per filter)"
            )
        self.observe_only = observing == {True}
        # One filter serves every chain: it asks Envoy for what any chain's plugins declared.
        chains_ = tuple(self.chains.values())
        self.metadata_namespaces = _declared_names(chains_, "metadata_namespaces")
        self.forwarding_namespaces = _declared_names(chains_, "forwarding_namespaces")
        self.request_attributes = _declared_names(chains_, "request_attributes")
        self.response_attributes = _declared_names(chains_, "response_attributes")
        self._plans: dict[str, StreamPlan] = {}

    def plan(self, chain: Chain) -> StreamPlan:
        """What a stream of `chain` needs to know, computed once per chain (streams are the hot path)."""
        plan = self._plans.get(chain.name)
        if plan is None:
            effective = self.effective_mode(chain)
            plan = self._plans[chain.name] = StreamPlan(
                mode_override=self.mode_override(chain),
                body_modes=(effective.request_body_mode, effective.response_body_mode),
                filter_body_modes=(self.mode.request_body_mode, self.mode.response_body_mode),
            )
        return plan

    def effective_mode(self, chain: Chain) -> Any:
        """What Envoy will send for a stream of `chain`."""
        return self.mode if self.full_duplex else chain.mode

    def mode_override(self, chain: Chain) -> Any:
        """The mode_override to send on the first answer, or None."""
        if self.full_duplex or self.observe_only or chain.mode == self.mode:
            return None
        return chain.mode

    @classmethod
    def from_specs(cls, specs: Iterable[ChainSpec]) -> Registry:
        return cls(Chain(s.name, [_instantiate(p) for p in s.plugins], s.on_error) for s in specs)

    def chain(self, name: str | None) -> Chain | None:
        return self.default if name is None else self.chains.get(name)


def _union(modes: Iterable[Any]) -> Any:
    union = ProcessingMode(
        request_header_mode=SEND, response_header_mode=SKIP, request_trailer_mode=SKIP, response_trailer_mode=SKIP
    )
    for mode in modes:
        for fld in ("response_header_mode", "request_trailer_mode", "response_trailer_mode"):
            if getattr(mode, fld) == SEND:
                setattr(union, fld, SEND)
        for fld in ("request_body_mode", "response_body_mode"):
            ours, theirs = getattr(union, fld), getattr(mode, fld)
            # Different body modes per chain can only be served by mode_override, which Envoy ignores with
            # FULL_DUPLEX_STREAMED; otherwise the filter gets the most capable mode and overrides narrow it.
            if ours and theirs and ours != theirs and FULL_DUPLEX in (ours, theirs):
                raise ConfigError(
                    f"chains disagree on {fld}: {BodyMode(ours).name} vs {BodyMode(theirs).name}; with "
                    "FULL_DUPLEX_STREAMED every chain of a sidecar must use the same body mode"
                )
            setattr(union, fld, max(ours, theirs, key=_BODY_RANK.__getitem__))
    return union


# For the filter-level mode when chains differ: the mode that can serve the others through mode_override.
_BODY_RANK = {
    BodyMode.NONE: 0,
    BodyMode.BUFFERED_PARTIAL: 1,
    BodyMode.BUFFERED: 2,
    BodyMode.STREAMED: 3,
    BodyMode.FULL_DUPLEX_STREAMED: 4,
}


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
