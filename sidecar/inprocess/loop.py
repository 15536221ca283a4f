"""The threads the in-process bridge owns inside Envoy: one asyncio event loop for async hooks, and a watchdog.

Envoy's workers must never wait on Python that awaits, so an `async def` hook runs on the loop thread and
its stream pauses (PENDING) until the bridge calls `native.schedule`. Each awaited hook has its own deadline
on the loop (`asyncio.timeout`). The watchdog is the backstop for what that deadline cannot reach: a hook that
blocks the loop thread itself (`time.sleep` in an `async def`) or swallows its cancellation. It settles the
stream's phase from its own thread, and when the loop has stopped turning it starts a replacement loop, so
one stuck hook costs its own request, not every later async hook of the process.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LoopThread", "Watchdog", "shared_loop"]

log = logging.getLogger("sidecar.inprocess")

#: How often the loop proves it still turns (for the watchdog's "is it stuck?" question).
_HEARTBEAT = 0.05


class Watchdog:
    """Calls a function at a monotonic time from one daemon thread, unless disarmed first. A disarmed entry lets
    go of its function at once (it may hold a whole stream), not when its time comes."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._actions: dict[int, Callable[[], None]] = {}
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sidecar-inprocess-watchdog", daemon=True)
        self._thread.start()

    def arm(self, when: float, action: Callable[[], None]) -> int:
        token = next(self._order)
        with self._wake:
            self._actions[token] = action
            heapq.heappush(self._heap, (when, token))
            if self._heap[0][1] == token:
                self._wake.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._wake:
            self._actions.pop(token, None)
            # A disarmed entry stays in the heap until its time; with long deadlines and a high request rate
            # they would pile up by the million. Rebuild from the live ones once they are the minority.
            if len(self._heap) > 2 * len(self._actions) + 64:
                self._heap = [entry for entry in self._heap if entry[1] in self._actions]
                heapq.heapify(self._heap)

    @property
    def armed(self) -> int:
        return len(self._actions)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, token = heapq.heappop(self._heap)
                action = self._actions.pop(token, None)
            if action is None:
                continue
            try:
                action()
            except Exception:  # the watchdog outlives any one stream's trouble
                log.exception("in-process watchdog action failed")


class LoopThread:
    """One asyncio event loop on a daemon thread; replaced by a new one when it stops turning."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.loop = self._start()
        self.watchdog = Watchdog()
        self.replaced = 0
        #: Called with the new loop after a replacement (from the watchdog's thread): what lives on the loop
        #: besides hooks (the metrics endpoint) moves there too.
        self.on_replace: list[Callable[[asyncio.AbstractEventLoop], None]] = []

    @staticmethod
    def _start() -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        loop.last_beat = time.monotonic()  # type: ignore[attr-defined]

        def beat() -> None:
            loop.last_beat = time.monotonic()  # type: ignore[attr-defined]
            loop.call_later(_HEARTBEAT, beat)

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(beat)
            loop.run_forever()

        threading.Thread(target=run, name="sidecar-inprocess-loop", daemon=True).start()
        return loop

    def submit(self, func: Callable[..., Any], *args: Any) -> asyncio.AbstractEventLoop:
        """Run `func(*args)` on the loop thread soon (from any thread); the loop it will run on."""
        loop = self.loop
        loop.call_soon_threadsafe(func, *args)
        return loop

    def stuck(self, loop: asyncio.AbstractEventLoop, for_seconds: float) -> bool:
        """Whether `loop` has not turned for `for_seconds` (a hook blocks its thread)."""
        beat: float = loop.last_beat  # type: ignore[attr-defined]
        return time.monotonic() - beat > for_seconds

    def replace(self, loop: asyncio.AbstractEventLoop) -> None:
        """Abandon a stuck `loop` (its thread stays blocked in the hook; it is a daemon) for a new one."""
        with self._lock:
            if self.loop is not loop:
                return  # someone replaced it already
            self.loop = new = self._start()
            self.replaced += 1
        log.error("in-process event loop blocked by a hook; started a replacement loop thread")
        for follow in list(self.on_replace):
            try:
                follow(new)
            except Exception:  # the replacement serves hooks whatever a follower does
                log.exception("in-process: moving to the replacement event loop failed")


_shared: LoopThread | None = None
_shared_lock = threading.Lock()


def shared_loop() -> LoopThread:
    """The process's one loop thread (and watchdog), started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = LoopThread()
        return _shared
