"""The HTTP/2 gRPC server: routes, listeners, and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from sidecar.config import Limits
from sidecar.extproc.http2.call import Handler
from sidecar.extproc.http2.connection import Connection
from sidecar.extproc.http2.limits import ReceiveBudget

__all__ = ["Http2Server"]

log = logging.getLogger("sidecar.http2")


class Http2Server:
    """Routes gRPC calls by path to handlers; listens on any number of asyncio servers."""

    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        max_message: int,
        limits: Limits | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.routes = dict(routes)
        #: Told the reason whenever the transport ends a call or a connection (for metrics).
        self.on_error: Callable[[str], None] = on_error or (lambda reason: None)
        self.max_message = max_message
        #: What a peer may cost: budgets, floods, timeouts, connections (`sidecar.config.Limits`).
        self.limits = limits or Limits()
        #: One per server, so one per worker process: every connection's received, unread messages.
        self.budget = ReceiveBudget(self.limits.receive_buffer)
        self.connections: set[Connection] = set()
        self._listeners: list[asyncio.AbstractServer] = []
        self._idle: asyncio.Event | None = None

    def protocol(self) -> Connection:
        return Connection(self)

    @property
    def stopping(self) -> bool:
        return self._idle is not None

    def add_listener(self, listener: asyncio.AbstractServer) -> None:
        self._listeners.append(listener)

    def stream_closed(self) -> None:
        # Idle only once every connection also sent its final GOAWAY: until the peer acks the draining PING,
        # a stream it opened before it saw the first GOAWAY may still arrive, and must be served.
        if self._idle is not None and not any(
            conn.streams or not conn.closed_for_new_streams for conn in self.connections
        ):
            self._idle.set()

    async def stop(self, grace: float) -> None:
        """Stop listening, let open calls finish within `grace` seconds, then cut the rest off."""
        for listener in self._listeners:
            listener.close()
        self._idle = asyncio.Event()
        for conn in list(self.connections):
            conn.drain()
        self.stream_closed()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("grace period over: cancelling %d open calls", sum(len(c.streams) for c in self.connections))
        for conn in list(self.connections):
            conn.abort()
        for listener in self._listeners:
            await listener.wait_closed()
