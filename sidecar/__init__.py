"""envoy-sidecar: a Python data-plane companion for Envoy and Envoy Gateway."""

from sidecar.errors import ConfigError, PluginLoadError, ProtocolError, SidecarError, WasmError

__all__ = ["ConfigError", "PluginLoadError", "ProtocolError", "SidecarError", "WasmError"]
__version__ = "0.1.0"
