"""Errors of the proxy-wasm host; all are WasmError, so the CLI prints them on one line."""

from __future__ import annotations

from sidecar.errors import WasmError

__all__ = [
    "WasmAbiError",
    "WasmCallError",
    "WasmLoadError",
    "WasmMemoryLimitError",
    "WasmStateError",
    "WasmTimeoutError",
]


class WasmLoadError(WasmError):
    """The file is not a loadable WebAssembly module, or it needs imports the host does not provide."""


class WasmAbiError(WasmLoadError):
    """The module has no proxy-wasm ABI marker, an unknown one, or lacks a required export."""


class WasmStateError(WasmError):
    """The testing API was used out of order (e.g. a callback on a failed VM or a finished stream)."""


class WasmCallError(WasmError):
    """A callback into the module trapped, hit a limit, or was refused (e.g. on_configure returned false).

    The VM is marked failed afterwards, as Envoy does; the Python process is unaffected.
    """

    def __init__(self, module: str, callback: str, reason: str) -> None:
        super().__init__(f"{module}: {callback} failed: {reason}")
        self.module = module
        self.callback = callback
        self.reason = reason


class WasmTimeoutError(WasmCallError):
    """A callback ran past its deadline (epoch interruption)."""


class WasmMemoryLimitError(WasmCallError):
    """The module tried to grow its memory past the configured limit."""
