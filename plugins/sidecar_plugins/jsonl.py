"""FULL_DUPLEX_STREAMED response rewriter for JSON Lines: adds a field to every line, so the body
changes length while it streams.

For responses whose content-type is `application/x-ndjson`, `application/jsonl` or `application/json-seq`
each complete line that is a JSON object gets `"<field>": <value>` added; other lines pass unchanged, and
other content types pass through untouched. Output is sent line by line as input arrives (a line split over
chunks waits for its end). `content-length` is removed, since the length changes.

    - use: jsonl-tag
      config: {field: served_by, value: envoy-sidecar}
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from sidecar import Context, Headers, Plugin

_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-seq")


def _is_jsonl(headers: Headers | None) -> bool:
    if headers is None:
        return False
    return headers.get("content-type", "").split(";", 1)[0].strip().lower() in _TYPES


class JsonlTag(Plugin):
    name = "jsonl-tag"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - {"field", "value"}
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; expected field, value")
        self.field = self.config.get("field", "served_by")
        if not isinstance(self.field, str) or not self.field:
            raise ValueError(f"field: expected a non-empty string, got {self.field!r}")
        self.value = self.config.get("value", "envoy-sidecar")

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        if _is_jsonl(headers):
            headers.remove("content-length")

    def _tag(self, line: bytes) -> bytes:
        try:
            document = json.loads(line)
        except ValueError:
            return line
        if not isinstance(document, dict):
            return line
        document[self.field] = self.value
        return json.dumps(document, separators=(",", ":")).encode()

    async def on_response_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        if not _is_jsonl(ctx.response_headers):
            async for chunk in chunks:
                yield chunk
            return
        pending = b""
        async for chunk in chunks:
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            if lines:
                yield b"".join(self._tag(line) + b"\n" for line in lines)
        if pending:
            yield self._tag(pending)
