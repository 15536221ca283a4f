"""Waiting on a condition with a deadline: the tests' one way to wait for another process."""

from __future__ import annotations

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
