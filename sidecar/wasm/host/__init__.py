"""A local proxy-wasm host on wasmtime: run an Envoy Wasm filter module from Python as Envoy would.

* plugin.py       `Plugin` and `HttpContext`: the testing API, callback by callback as Envoy calls them
* exchange.py     `run_exchange`: one whole request and response through a plugin, framed as Envoy frames it
* upstream.py     `HttpUpstream`, `cluster_responder`: real upstreams and callouts, failing as Envoy's router
* instance.py     `Instance`: one instantiated module, its host state, guarded calls into it
* binding.py      `HostState` (what host functions see), `@host_function` signatures, `link()`
* imports.py      the `env.proxy_*` host functions
* wasi.py         the WASI preview1 subset Envoy provides
* vm.py           engines, limits, the compiled-code cache
* memory.py       bounds-checked access to guest memory
* state.py        streams, logs, metrics, shared data, callouts
* properties.py   the values behind proxy_get_property, by phase, as Envoy 1.40 answers them
* foreign.py      the foreign functions behind proxy_call_foreign_function (compress, uncompress, ...)
* abi.py          ABI versions, enums, the header-map wire format
* errors.py       `WasmLoadError` and the rest, all `WasmError`
"""

from __future__ import annotations

from sidecar.wasm.host.abi import AbiVersion, Action, LogLevel, MapType, Status
from sidecar.wasm.host.errors import (
    WasmAbiError,
    WasmCallError,
    WasmLoadError,
    WasmMemoryLimitError,
    WasmStateError,
    WasmTimeoutError,
    WasmUpstreamError,
)
from sidecar.wasm.host.plugin import HttpContext, Plugin
from sidecar.wasm.host.state import HttpCall, HttpCallResponse, LocalResponse, LogRecord
from sidecar.wasm.host.vm import Limits

__all__ = [
    "AbiVersion",
    "Action",
    "HttpCall",
    "HttpCallResponse",
    "HttpContext",
    "Limits",
    "LocalResponse",
    "LogLevel",
    "LogRecord",
    "MapType",
    "Plugin",
    "Status",
    "WasmAbiError",
    "WasmCallError",
    "WasmLoadError",
    "WasmMemoryLimitError",
    "WasmStateError",
    "WasmTimeoutError",
    "WasmUpstreamError",
]
