"""Waiting on a condition with a deadline: `wait_for` for another process, `wait_until` for server state
in the test's own event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll `condition` until it is true; an AssertionError naming `what` once `timeout` seconds pass.

    A condition may itself raise (say, when the process it waits for has died) to fail at once."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition the test cannot await directly (server state), with a deadline, yielding to the loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.005)
