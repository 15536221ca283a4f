"""JSON field redactor for buffered bodies, with a size limit.

Replaces the values of the named fields (at any depth, names compared case-insensitively) in JSON
request and/or response bodies. Bodies over `max_bytes` are refused with 413 before Envoy buffers them
when a content-length says so, or once buffered otherwise; a response over it becomes a 502, so nothing
the redactor could not inspect gets through. A body that claims to be JSON and is not
gets 400 on the request side and passes unchanged on the response side.

    - use: json-redact
      config:
        fields: [password, card_number]
        replacement: "[REDACTED]"
        max_bytes: 65536
        direction: both            # request | response | both
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sidecar import BodyMode, Context, Headers, Plugin, Respond

_OPTIONS = {"fields", "replacement", "max_bytes", "direction"}


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class JsonRedact(Plugin):
    name = "json-redact"
    request_body = BodyMode.BUFFERED
    response_body = BodyMode.BUFFERED

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - _OPTIONS
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(_OPTIONS))}")
        fields = self.config.get("fields", ["password"])
        if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
            raise ValueError(f"fields: expected a list of field names, got {fields!r}")
        self.fields = frozenset(f.lower() for f in fields)
        self.replacement = self.config.get("replacement", "[REDACTED]")
        self.max_bytes = self.config.get("max_bytes", 1024 * 1024)
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_bytes: expected a positive whole number, got {self.max_bytes!r}")
        direction = self.config.get("direction", "both")
        if direction not in ("request", "response", "both"):
            raise ValueError(f"direction: expected request, response or both, got {direction!r}")
        # An instance that does not need a direction drops its hooks, so Envoy is not asked for those bodies.
        if direction == "response":
            self.on_request_headers = None  # type: ignore[method-assign,assignment]
            self.on_request_body = None  # type: ignore[method-assign,assignment]
        if direction == "request":
            self.on_response_body = None  # type: ignore[method-assign,assignment]

    def _too_large(self, length: int) -> Respond:
        return Respond(
            413, f"body of {length} bytes exceeds the limit of {self.max_bytes}\n", {"content-type": "text/plain"}
        )

    def on_request_headers(self, ctx: Context, headers: Headers) -> Respond | None:
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            return self._too_large(int(length))
        return None

    def _redact(self, value: Any) -> tuple[Any, bool]:
        if isinstance(value, dict):
            changed = False
            out: dict[str, Any] = {}
            for key, item in value.items():
                if key.lower() in self.fields:
                    out[key] = self.replacement
                    changed = True
                else:
                    out[key], sub = self._redact(item)
                    changed = changed or sub
            return out, changed
        if isinstance(value, list):
            results = [self._redact(item) for item in value]
            return [r[0] for r in results], any(r[1] for r in results)
        return value, False

    def _process(self, body: bytes, headers: Headers | None, request: bool) -> bytes | Respond | None:
        if len(body) > self.max_bytes:
            if request:
                return self._too_large(len(body))
            # Fail closed: never pass on a response the redactor could not inspect.
            return Respond(502, b"response body exceeds the redaction limit\n", {"content-type": "text/plain"})
        if headers is None or not _is_json(headers.get("content-type")):
            return None
        try:
            document = json.loads(body)
        except ValueError:
            if request:
                return Respond(400, b"request body is not valid JSON\n", {"content-type": "text/plain"})
            return None
        redacted, changed = self._redact(document)
        return json.dumps(redacted, separators=(",", ":")).encode() if changed else None

    def on_request_body(self, ctx: Context, body: bytes) -> bytes | Respond | None:
        return self._process(body, ctx.request_headers, request=True)

    def on_response_body(self, ctx: Context, body: bytes) -> bytes | Respond | None:
        return self._process(body, ctx.response_headers, request=False)
