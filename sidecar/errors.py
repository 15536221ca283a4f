"""The exception hierarchy of envoy-sidecar.

* SidecarError                  root; the CLI prints its message on one line and exits 2
  + ConfigError                 a config file, flag or value is wrong (user input)
  + PluginLoadError             a plugin cannot be found, imported or built
  + ProtocolError               Envoy sent something the ext_proc protocol does not allow
  + StreamFailure               one ext_proc stream cannot go on (a FULL_DUPLEX body stage failed or
                                missed its deadline): that gRPC stream is failed, the server goes on
  + WasmError                   anything about Wasm modules (fetch, verify, cache, host)
  + InProcessUnavailable        the in-process backend's native module was not built for this Python

Errors a plugin raises while handling a request are not SidecarErrors: the chain's failure policy
turns them into a 500 or lets the request through, and the server keeps serving.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InProcessUnavailable",
    "PluginLoadError",
    "ProtocolError",
    "SidecarError",
    "StreamFailure",
    "WasmError",
]


class SidecarError(Exception):
    """Root of every error envoy-sidecar raises on purpose."""


class ConfigError(SidecarError):
    """User input (a config file, a flag, a value) is not what was expected."""


class PluginLoadError(SidecarError):
    """A plugin could not be found, imported or instantiated."""


class ProtocolError(SidecarError):
    """Envoy sent a message the ext_proc protocol does not allow at this point of the stream."""


class StreamFailure(SidecarError):
    """A streaming body stage failed or missed its deadline: its gRPC stream must be failed (Envoy then
    answers 500, or cuts a response already under way)."""


class WasmError(SidecarError):
    """A Wasm module could not be fetched, verified, cached or run."""


class InProcessUnavailable(SidecarError):
    """The in-process backend's native module (libsidecar_inprocess.so) is not installed: this Python has no
    shared libpython, or the module did not compile when the package was installed."""
