"""What a peer may cost: the receive budget a process's connections share, and one connection's flood guard.

The numbers come from `sidecar.config.Limits` (docs/serving.md). Both classes only count and judge; the
connection decides what a verdict costs the peer (a call ended with RESOURCE_EXHAUSTED, a stream refused,
or GOAWAY ENHANCE_YOUR_CALM), so the hot path pays one attribute update per frame that carries data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from sidecar.config import Limits
from sidecar.extproc.http2.frames import ErrorCode, Http2Error

__all__ = ["CALL_COST", "FloodGuard", "ReceiveBudget", "largest_holder"]

#: What an open call costs the receive budgets before it holds a byte: its Call, task and the stream's
#: processor (measured: 4000 ext_proc streams waiting for their first message added 5.5 KiB of RSS each).
#: Without it a peer could park 1024 empty streams on each of 1024 connections in one process.
CALL_COST = 8192
#: Control-frame tokens earned by one frame that carries data (either way) or opens a stream: Envoy
#: allows 10 WINDOW_UPDATEs per DATA frame it sends, and a reader's flow control answers data with them.
_TOKENS_PER_PROGRESS = 10


class ReceiveBudget:
    """Bytes held in received, not yet consumed messages (and open calls), over every connection it covers."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def admits(self, size: int) -> bool:
        return self.used + size <= self.limit


class _Holder(Protocol):
    @property
    def _buffered(self) -> int: ...


_H = TypeVar("_H", bound=_Holder)


def largest_holder(calls: Iterable[_H]) -> _H | None:
    """The call holding the most buffered bytes (`call.Call`); the one to end when a budget is exceeded."""
    return max(calls, key=lambda call: call._buffered, default=None)


def _calm(reason: str, message: str) -> Http2Error:
    return Http2Error(ErrorCode.ENHANCE_YOUR_CALM, message, reason)


class FloodGuard:
    """One connection's flood counters. Each check raises `Http2Error(ENHANCE_YOUR_CALM)` past its limit.

    `progress` is the connection's count of frames that did work (data either way, streams opened): the
    guard reads it to tell a flood of frames that do nothing from a busy peer."""

    __slots__ = (
        "_clock",
        "_empty_mark",
        "_empty_run",
        "_limits",
        "_opened",
        "_premature",
        "_progress_mark",
        "_refilled",
        "_tokens",
        "_unread",
    )

    def __init__(self, limits: Limits, clock: Callable[[], float]) -> None:
        self._limits = limits
        self._clock = clock
        self._empty_run = self._empty_mark = 0
        self._tokens = float(limits.control_frame_burst)
        self._refilled = clock()
        self._progress_mark = 0
        self._opened = self._premature = 0
        self._unread = 0

    def empty_frame(self, progress: int) -> None:
        """A DATA, HEADERS or CONTINUATION frame with no payload that does not end its stream."""
        if progress != self._empty_mark:
            self._empty_mark, self._empty_run = progress, 0
        self._empty_run += 1
        if self._empty_run > self._limits.max_empty_frames:
            raise _calm("empty_frames", f"more than {self._limits.max_empty_frames} consecutive frames without payload")

    def control_frame(self, progress: int) -> None:
        """PING, SETTINGS, WINDOW_UPDATE, PRIORITY, RST_STREAM or an unknown frame type: one token each."""
        self._tokens -= 1
        if self._tokens >= 0:
            return
        # Out of tokens: earn back what time and work since the last refill are worth, then judge.
        limits = self._limits
        now = self._clock()
        earned = (now - self._refilled) * limits.control_frame_rate
        earned += (progress - self._progress_mark) * _TOKENS_PER_PROGRESS
        self._refilled, self._progress_mark = now, progress
        self._tokens = min(float(limits.control_frame_burst), self._tokens + earned)
        if self._tokens < 0:
            raise _calm(
                "control_frames",
                f"control frame flood: over {limits.control_frame_burst} control frames "
                f"plus {limits.control_frame_rate:g} a second",
            )

    def stream_opened(self) -> None:
        self._opened += 1

    def premature_end(self) -> None:
        """A stream the peer reset, or this side refused, before its handler took a message (rapid reset).

        As Envoy does: tolerated until half of `premature_reset_streams`, and while under half of all
        the streams the peer opened, so a healthy client that cancels some requests is never cut off."""
        self._premature += 1
        if self._premature * 2 >= max(self._opened, self._limits.premature_reset_streams):
            raise _calm(
                "rapid_reset", f"rapid reset: {self._premature} of {self._opened} streams ended before any work"
            )

    def reply(self, unsent: int) -> None:
        """This side queues a reply the peer asked for (an ack, a reset); `unsent` bytes still wait to go out."""
        if not unsent:
            self._unread = 0  # everything queued before was read
        self._unread += 1
        if self._unread > self._limits.max_unread_replies:
            raise _calm("unread_replies", f"the peer left {self._unread} replies unread")
