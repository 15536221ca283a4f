"""Server-sent events meter for AI gateways: counts the `data:` events of a streamed (SSE) response and
the text they carry, without holding the stream back.

For `text/event-stream` responses, every chunk passes on unchanged; the plugin counts events, and for
OpenAI-style chat completion chunks (`{"choices": [{"delta": {"content": ...}}]}`) it counts the content's
characters and whitespace-separated words (a cheap token estimate), and notes the `usage` object if the
server sent one and whether the stream ended with `[DONE]`. At the end of the body the totals go into
dynamic metadata (`envoy-sidecar` namespace: `sse_events`, `sse_words`, `sse_chars`, `sse_done`, and
`sse_usage_total_tokens` if known) for access logs and rate limiting.

    - use: sse-meter
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar import Context, Headers, Plugin, StateKey


@dataclass
class _Meter:
    active: bool
    pending: bytes = b""
    events: int = 0
    words: int = 0
    chars: int = 0
    done: bool = False
    total_tokens: int | None = None


_METER = StateKey[_Meter]("sse-meter")


class SseMeter(Plugin):
    name = "sse-meter"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        if self.config:
            raise ValueError(f"takes no options, got {', '.join(sorted(self.config))}")

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        ctx.state[_METER] = _Meter(active=media == "text/event-stream")

    def _data(self, meter: _Meter, payload: bytes) -> None:
        meter.events += 1
        text = payload.strip()
        if text == b"[DONE]":
            meter.done = True
            return
        try:
            document = json.loads(text)
        except ValueError:
            words = text.decode("utf-8", "replace")
            meter.chars += len(words)
            meter.words += len(words.split())
            return
        if not isinstance(document, dict):
            return
        for choice in document.get("choices") or ():
            content = (choice.get("delta") or {}).get("content") if isinstance(choice, dict) else None
            if isinstance(content, str):
                meter.chars += len(content)
                meter.words += len(content.split())
        usage = document.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            meter.total_tokens = usage["total_tokens"]

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> None:
        meter = ctx.state.get(_METER)
        if meter is None or not meter.active:
            return
        lines = (meter.pending + chunk).split(b"\n")
        meter.pending = b"" if end else lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                self._data(meter, line[5:])
        if end:
            ctx.set_metadata("sse_events", meter.events)
            ctx.set_metadata("sse_words", meter.words)
            ctx.set_metadata("sse_chars", meter.chars)
            ctx.set_metadata("sse_done", meter.done)
            if meter.total_tokens is not None:
                ctx.set_metadata("sse_usage_total_tokens", meter.total_tokens)
