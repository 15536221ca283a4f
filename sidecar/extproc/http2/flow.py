"""HTTP/2 flow control (RFC 9113 section 5.2), one window per direction, per connection and per stream.

`ReceiveWindow` is what the peer may still send here and the credit owed back to it; `SendWindow` is what
this side may still send and the senders waiting for more. Neither writes frames: the connection and the
call decide when credit goes back (`window_update`) and what an overrun costs.
"""

from __future__ import annotations

import asyncio

from sidecar.extproc.http2.frames import MAX_WINDOW

__all__ = ["ReceiveWindow", "SendWindow"]


class ReceiveWindow:
    """What the peer may still send, and the credit to return to it in large steps (half a window)."""

    __slots__ = ("_step", "size", "unacked")

    def __init__(self, size: int) -> None:
        self.size = size
        #: Received, and not yet returned as credit.
        self.unacked = 0
        self._step = size // 2

    def consume(self, length: int) -> bool:
        """Count `length` flow-controlled bytes received; False when they overran the window."""
        self.size -= length
        if self.size < 0:
            return False
        self.unacked += length
        return True

    @property
    def credit_due(self) -> bool:
        return self.unacked >= self._step

    def return_credit(self) -> int:
        """The WINDOW_UPDATE increment for everything received so far; the window grows by it."""
        increment, self.unacked = self.unacked, 0
        self.size += increment
        return increment


class SendWindow:
    """What this side may still send, and the senders waiting for the peer to give more."""

    __slots__ = ("_waiter", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._waiter: asyncio.Future[None] | None = None

    def grow(self, increment: int) -> bool:
        """Add credit (a WINDOW_UPDATE, or a SETTINGS change, which may be negative); False on overflow."""
        self.size += increment
        return self.size <= MAX_WINDOW

    async def wait(self) -> None:
        """Until `wake`: more credit, or something else a blocked sender must look at."""
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        # Shared by every blocked sender: shielded, so cancelling one of them does not cancel the others.
        await asyncio.shield(self._waiter)

    def wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
