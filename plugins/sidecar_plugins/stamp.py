"""Header stamper: request id in, Server-Timing out.

Request: makes sure `x-request-id` is set (Envoy usually generates one) and adds a configurable header.
Response: echoes the request id and adds `server-timing: sidecar;dur=<ms>` covering the upstream time.

    - use: header-stamp
      config:
        request_header: x-stamped-by      # added to the request (default: x-stamped-by)
        value: envoy-sidecar
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sidecar import Context, Headers, Plugin, StateKey

STARTED = StateKey[float]("header-stamp.started")


class HeaderStamp(Plugin):
    name = "header-stamp"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.request_header = str(self.config.get("request_header", "x-stamped-by"))
        self.value = str(self.config.get("value", "envoy-sidecar"))
        unknown = set(self.config) - {"request_header", "value"}
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; expected request_header, value")

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        ctx.state[STARTED] = time.perf_counter()
        if "x-request-id" not in headers:
            headers["x-request-id"] = ctx.request_id
        headers[self.request_header] = self.value

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-request-id"] = ctx.request_id
        started = ctx.state.get(STARTED)
        if started is not None:
            headers.append("server-timing", f"sidecar;dur={(time.perf_counter() - started) * 1000:.2f}")
