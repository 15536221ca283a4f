"""Streaming redactor: replaces a literal byte pattern in bodies of any size, even when a match spans
chunk boundaries.

Each chunk is passed on at once except its last `len(pattern) - 1` bytes, which are held back until the
next chunk shows whether they start a match; the end of the body releases them. Works in STREAMED
(the default) and, when another plugin of the chain makes it FULL_DUPLEX_STREAMED, there too. In
STREAMED mode a body that ends with trailers (HTTP/2, gRPC) gives no end-of-stream chunk, so up to
`len(pattern) - 1` held bytes are lost; FULL_DUPLEX_STREAMED flushes them before the trailers.

    - use: stream-redact
      config:
        pattern: "4111-1111-1111-1111"
        replacement: "****"           # default: "*" * len(pattern)
        direction: both               # request | response | both
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar import Context, Plugin, StateKey

_OPTIONS = {"pattern", "replacement", "direction"}


class StreamRedact(Plugin):
    name = "stream-redact"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - _OPTIONS
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(_OPTIONS))}")
        pattern = self.config.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"pattern: expected a non-empty string, got {pattern!r}")
        self.pattern = pattern.encode()
        replacement = self.config.get("replacement", "*" * len(pattern))
        if not isinstance(replacement, str):
            raise ValueError(f"replacement: expected a string, got {replacement!r}")
        self.replacement = replacement.encode()
        direction = self.config.get("direction", "both")
        if direction not in ("request", "response", "both"):
            raise ValueError(f"direction: expected request, response or both, got {direction!r}")
        self._held = {
            "request": StateKey[bytes]("stream-redact.request"),
            "response": StateKey[bytes]("stream-redact.response"),
        }
        if direction == "response":
            self.on_request_chunk = None  # type: ignore[method-assign,assignment]
        if direction == "request":
            self.on_response_chunk = None  # type: ignore[method-assign,assignment]

    def _redact(self, ctx: Context, direction: str, chunk: bytes, end: bool) -> bytes:
        key = self._held[direction]
        data = ctx.state.get(key, b"") + chunk
        if end:
            ctx.state[key] = b""
            return data.replace(self.pattern, self.replacement)
        # A match starting before `cut` lies wholly in `data`; anything after it might be the start of a
        # match the next chunk completes, so it is held back.
        cut = len(data) - (len(self.pattern) - 1)
        boundary = max(cut, 0)
        start = 0
        while (found := data.find(self.pattern, start)) != -1 and found < cut:
            start = found + len(self.pattern)
            boundary = max(boundary, start)
        ctx.state[key] = data[boundary:]
        return data[:boundary].replace(self.pattern, self.replacement)

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        return self._redact(ctx, "request", chunk, end)

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        return self._redact(ctx, "response", chunk, end)
