"""A worker's last resort against an event loop that stopped turning.

A hook that never gives the event loop back stops every stream on its worker: a synchronous loop in Python (a
hook's deadline is an `asyncio` timeout, which only an `await` lets fire), or code blocked in C while it holds the
GIL (a catastrophic regular expression, a C library call that hangs). Then nothing on the worker's loop runs, not
even the FULL_DUPLEX `stream_timeout` (Envoy has no timeout of its own there), and its streams wait as long as the
hook does, or until Envoy's stream idle timeout (5 minutes by default). `watch_stalls` re-arms faulthandler's timer
from the loop; when the loop has not come back for `stall_timeout` seconds, faulthandler's own thread, which
needs no GIL, writes every thread's stack to stderr and ends the process (exit code 1). Its connections close,
Envoy answers their streams by the chain's policy, and the supervisor (or the orchestrator) starts a fresh
worker.

The timer counts wall time, so a worker paused whole for longer than `stall_timeout` (SIGSTOP, a frozen cgroup,
`docker pause`) exits as soon as it resumes: the loop gets no chance to re-arm it first. Set `stall_timeout: 0`
where pausing is expected.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys

__all__ = ["watch_stalls"]

log = logging.getLogger("sidecar.server")


async def watch_stalls(seconds: float) -> None:
    """Keep the stall timer `seconds` ahead of the loop until cancelled (which disarms it)."""
    period = min(1.0, seconds / 4)
    try:
        faulthandler.dump_traceback_later(seconds, exit=True, file=sys.stderr)
    except (ValueError, OSError, RuntimeError) as exc:  # stderr without a file descriptor: nothing to write to
        log.warning("no stall watchdog (stall_timeout): %s", exc)
        return
    try:
        while True:
            await asyncio.sleep(period)
            faulthandler.dump_traceback_later(seconds, exit=True, file=sys.stderr)
    finally:
        faulthandler.cancel_dump_traceback_later()
