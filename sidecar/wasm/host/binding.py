"""What host functions bind to, and how they are linked into a module.

* `HostState`: the state of one instance that host functions read and write (a Protocol, so the host
  functions in imports.py and wasi.py depend on this shape, not on `Instance`, which links them).
* `@host_function(params=..., results=...)`: the function's Wasm signature, written on the function.
* `link(linker, module, providers)`: define exactly the imports a module asks for, checking each one's
  signature; a missing or mismatched import fails the load, as in Envoy.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import wasmtime

from sidecar.wasm.host.abi import AbiVersion, LogLevel
from sidecar.wasm.host.errors import WasmLoadError
from sidecar.wasm.host.memory import GuestMemory
from sidecar.wasm.host.properties import Properties
from sidecar.wasm.host.state import HostBudget, HttpCall, HttpCallResponse, Metric, SharedState, StreamState

__all__ = ["I32", "I64", "HostSignature", "HostState", "available", "host_function", "host_functions", "link"]

I32 = wasmtime.ValType.i32()
I64 = wasmtime.ValType.i64()

_F = TypeVar("_F", bound=Callable[..., Any])
_SIGNATURE = "__host_signature__"


class HostState(Protocol):
    """One instance as its host functions see it (implemented by `instance.Instance`)."""

    memory: GuestMemory
    budget: HostBudget
    abi: AbiVersion
    log_level: LogLevel
    plugin_configuration: bytes
    properties: Properties
    random: random.Random
    streams: dict[int, StreamState]
    metrics: dict[int, Metric]
    metric_ids: dict[tuple[int, str], int]
    histograms: dict[str, list[int]]
    shared: SharedState
    http_calls: dict[int, HttpCall]
    next_token: int
    tick_period_ms: int
    queue_ready: list[tuple[int, int]]
    call_response: HttpCallResponse | None
    status: tuple[int, bytes]
    root_context_id: int
    active_context: int
    current_callback: str  # the export being called ("" between calls)

    @property
    def vm_id(self) -> str: ...

    @property
    def vm_configuration(self) -> bytes: ...

    @property
    def environment(self) -> Mapping[str, str]: ...

    @property
    def clusters(self) -> frozenset[str] | None:
        """The clusters proxy_http_call may name; None allows any."""
        ...

    def stream(self) -> StreamState | None:
        """The stream of the active context, if it is an HTTP context."""
        ...

    def log(self, level: LogLevel, message: str) -> None: ...


@dataclass(frozen=True)
class HostSignature:
    params: tuple[wasmtime.ValType, ...]
    results: tuple[wasmtime.ValType, ...]

    def func_type(self) -> wasmtime.FuncType:
        return wasmtime.FuncType(list(self.params), list(self.results))


def host_function(
    *, params: tuple[wasmtime.ValType, ...] = (), results: tuple[wasmtime.ValType, ...] = ()
) -> Callable[[_F], _F]:
    """Mark a method as the host function of its name, with this Wasm signature (after the Caller)."""

    def mark(func: _F) -> _F:
        setattr(func, _SIGNATURE, HostSignature(params, results))
        return func

    return mark


def host_functions(cls: type) -> dict[str, HostSignature]:
    """The host functions a class defines, by name, with their signatures."""
    found: dict[str, HostSignature] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            signature = getattr(value, _SIGNATURE, None)
            if isinstance(signature, HostSignature):
                found[name] = signature
    return found


# Host functions Envoy registers only for some ABI versions (cpp-host registerCallbacks): a module of
# another version that imports one fails to load, as in Envoy ("missing import").
_ONLY_FOR: dict[str, frozenset[AbiVersion]] = {
    **dict.fromkeys(
        ("proxy_get_configuration", "proxy_continue_request", "proxy_continue_response", "proxy_clear_route_cache"),
        frozenset({AbiVersion.V0_1_0}),
    ),
    **dict.fromkeys(
        ("proxy_continue_stream", "proxy_close_stream"),
        frozenset({AbiVersion.V0_2_0, AbiVersion.V0_2_1, AbiVersion.V0_2_100}),
    ),
    "proxy_get_log_level": frozenset({AbiVersion.V0_2_1, AbiVersion.V0_2_100}),
}


def available(name: str, abi: AbiVersion) -> bool:
    """Whether Envoy links host function `name` into a module of ABI version `abi`."""
    return abi in _ONLY_FOR.get(name, frozenset(AbiVersion))


def link(
    linker: wasmtime.Linker,
    module: wasmtime.Module,
    module_name: str,
    providers: Mapping[str, object],
    abi: AbiVersion,
) -> None:
    """Define exactly the imports `module` asks for, from `providers` (import module name -> object whose
    `@host_function` methods provide it); a missing one fails the load, as in Envoy."""
    tables = {namespace: host_functions(type(target)) for namespace, target in providers.items()}
    defined: set[tuple[str, str]] = set()
    for imp in module.imports:
        table = tables.get(imp.module, {})
        name = imp.name or ""
        where = f"{module_name}: import {imp.module}.{name}"
        if name not in table:
            raise WasmLoadError(f"{where} is not provided by the host (nor by Envoy's)")
        if imp.module == "env" and not available(name, abi):
            raise WasmLoadError(f"{where} does not exist in proxy-wasm ABI {abi.value} (Envoy refuses it too)")
        expected = table[name].func_type()
        wanted = imp.type
        if not isinstance(wanted, wasmtime.FuncType) or (
            list(map(str, wanted.params)),
            list(map(str, wanted.results)),
        ) != (list(map(str, expected.params)), list(map(str, expected.results))):
            raise WasmLoadError(f"{where} has the wrong signature for the proxy-wasm ABI")
        if (imp.module, name) not in defined:  # a module may import the same function twice
            defined.add((imp.module, name))
            linker.define_func(imp.module, name, expected, getattr(providers[imp.module], name), access_caller=True)
