"""A local proxy-wasm host on wasmtime: run an Envoy Wasm filter module from Python as Envoy would."""

from __future__ import annotations

from sidecar.wasm.host.abi import AbiVersion, Action, LogLevel, MapType, Status
from sidecar.wasm.host.errors import (
    WasmAbiError,
    WasmCallError,
    WasmLoadError,
    WasmMemoryLimitError,
    WasmStateError,
    WasmTimeoutError,
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
]
