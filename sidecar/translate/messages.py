"""Small helpers over envoy-data-plane messages shared by the translator modules.

envoy-data-plane takes ~0.5 s to import, so every module imports it inside functions; these helpers
keep that boilerplate in one place.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

__all__ = ["address", "enable_on_route", "pack", "parse_duration", "pipe_address"]

_DURATION_PART = re.compile(r"([0-9]+)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: str) -> datetime.timedelta:
    """A Gateway API duration (`1h30m`, `500ms`; already validated) as a timedelta."""
    seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(value))
    return datetime.timedelta(seconds=seconds)


def pack(message: Any) -> Any:
    from envoy_data_plane.google.protobuf import Any as AnyMessage

    return AnyMessage.pack(message)


def address(host: str, port: int) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress

    return Address(socket_address=SocketAddress(address=host, port_value=port))


def pipe_address(path: str) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import Address, Pipe

    return Address(pipe=Pipe(path=path))


def enable_on_route() -> Any:
    """What EG puts in a route's typed_per_filter_config to turn on a filter that is disabled by default."""
    from envoy_data_plane.envoy.config.route.v3 import FilterConfig

    return pack(FilterConfig())
