"""Request body sha256, computed while the body streams through (nothing is buffered).

The hex digest and the byte count go into dynamic metadata (`envoy-sidecar` namespace:
`request_body_sha256`, `request_body_bytes`) for access logs and later filters; when the request has
trailers (HTTP/2, gRPC) the digest is also added as the trailer `x-body-sha256`.

    - use: body-digest
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from sidecar import Context, Headers, Plugin, StateKey

_HASH = StateKey[Any]("body-digest.hash")
_SIZE = StateKey[int]("body-digest.size")


class BodyDigest(Plugin):
    name = "body-digest"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        if self.config:
            raise ValueError(f"takes no options, got {', '.join(sorted(self.config))}")

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> None:
        digest = ctx.state.get(_HASH)
        if digest is None:
            digest = ctx.state[_HASH] = hashlib.sha256()
        digest.update(chunk)
        ctx.state[_SIZE] = ctx.state.get(_SIZE, 0) + len(chunk)
        if end:
            self._publish(ctx)

    def on_request_trailers(self, ctx: Context, trailers: Headers) -> None:
        trailers["x-body-sha256"] = self._publish(ctx)

    def _publish(self, ctx: Context) -> str:
        digest = ctx.state.get(_HASH) or hashlib.sha256()
        hexdigest: str = digest.hexdigest()
        ctx.set_metadata("request_body_sha256", hexdigest)
        ctx.set_metadata("request_body_bytes", ctx.state.get(_SIZE, 0))
        return hexdigest
