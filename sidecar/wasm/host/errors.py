"""Errors of the proxy-wasm host (`sidecar.wasm.host`): one class per thing a user can act on.

* WasmError                         (sidecar.errors) the CLI prints its message on one line and exits 2
  + WasmLoadError                   the file is not a loadable module, or needs imports the host lacks
    + WasmAbiError                  no, or an unknown, proxy-wasm ABI marker, or a missing export
  + WasmStateError                  the testing API was used out of order
  + WasmUpstreamError               a real upstream (upstream.py) was misconfigured or answered past a bound
  + WasmCallError                   a callback trapped, hit a limit or was refused; `module`, `callback`, `reason`
    + WasmTimeoutError              a callback ran past its deadline
    + WasmMemoryLimitError          the module tried to grow its memory past the limit
    + WasmHostLimitError            the module tried to make the host keep more than its budget
  + ProcExit                        internal: the guest called WASI proc_exit; becomes a WasmCallError
  + HostBudgetExceeded              internal: a host function refused to keep more; becomes a WasmHostLimitError

After a WasmCallError the VM is marked failed, as Envoy does; the Python process is unaffected.
"""

from __future__ import annotations

from sidecar.errors import WasmError

__all__ = [
    "HostBudgetExceeded",
    "ProcExit",
    "WasmAbiError",
    "WasmCallError",
    "WasmHostLimitError",
    "WasmLoadError",
    "WasmMemoryLimitError",
    "WasmStateError",
    "WasmTimeoutError",
    "WasmUpstreamError",
]


class WasmLoadError(WasmError):
    """The file is not a loadable WebAssembly module, or it needs imports the host does not provide."""


class WasmAbiError(WasmLoadError):
    """The module has no proxy-wasm ABI marker, an unknown one, or lacks a required export."""


class WasmStateError(WasmError):
    """The testing API was used out of order (e.g. a callback on a failed VM or a finished stream)."""


class WasmUpstreamError(WasmError):
    """A real upstream's address is not HOST:PORT, or its answer went past a bound (body size)."""


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


class WasmHostLimitError(WasmCallError):
    """A host function would have kept more guest data (logs, shared data, queues, headers...) than the
    VM's host-state budget (`Limits.host_state_bytes`) allows."""


class HostBudgetExceeded(WasmError):
    """Raised by a host function to unwind the guest when the host-state budget would be exceeded.

    Internal: the instance catches it and raises a WasmHostLimitError naming the callback instead.
    """


class ProcExit(WasmError):
    """The guest called WASI proc_exit; raised by the host function to unwind the guest.

    Internal: the instance catches it and raises a WasmCallError naming the exit code instead.
    """

    def __init__(self, code: int) -> None:
        super().__init__(f"module called proc_exit({code})")
        self.code = code
