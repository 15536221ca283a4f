"""envoy-sidecar: a Python data-plane companion for Envoy and Envoy Gateway.

from sidecar import Plugin, Respond, BodyMode

class Deny(Plugin):
    def on_request_headers(self, ctx, headers):
        if "authorization" not in headers:
            return Respond(401, body=b"missing credentials")
"""

from sidecar.errors import ConfigError, PluginLoadError, ProtocolError, SidecarError, WasmError
from sidecar.headers import Headers
from sidecar.instruments import Counter, Gauge, Histogram
from sidecar.plugins import BodyMode, Context, Plugin, Respond, State, StateKey

__all__ = [
    "BodyMode",
    "ConfigError",
    "Context",
    "Counter",
    "Gauge",
    "Headers",
    "Histogram",
    "Plugin",
    "PluginLoadError",
    "ProtocolError",
    "Respond",
    "SidecarError",
    "State",
    "StateKey",
    "WasmError",
]
__version__ = "0.1.0"
