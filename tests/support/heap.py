"""Memory peaks sampled every 20 ms while something runs: Envoy's heap (admin `/memory`), a process's RSS."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from sidecar.stack.envoy import Envoy
from tests.support.proc import rss


class PeakSampler:
    """`with PeakSampler(read) as sampler: ...`, then `sampler.peak` (the largest `read()` seen, the start
    included) and `sampler.grew` (how far it rose above the start). A `read` that failed in the sampling thread
    fails both instead of leaving a peak that stopped being sampled, which would pass any bound."""

    def __init__(self, read: Callable[[], int], interval: float = 0.02) -> None:
        self.read = read
        self.interval = interval
        self.start = self._peak = read()
        self.failed: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, self.read())
        except Exception as exc:
            self.failed = exc

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.failed is None:
            self._peak = max(self._peak, self.read())

    @property
    def peak(self) -> int:
        if self.failed is not None:
            raise AssertionError(f"the peak was not sampled to the end: {self.failed!r}")
        return self._peak

    @property
    def grew(self) -> int:
        return self.peak - self.start


def envoy_heap(envoy: Envoy) -> PeakSampler:
    """Envoy's `allocated` (tcmalloc's bytes handed out: what Envoy holds, buffers and copies, rather than what the
    allocator keeps mapped, as RSS would)."""
    return PeakSampler(lambda: int(json.loads(envoy.admin("/memory"))["allocated"]))


def process_rss(pid: int) -> PeakSampler:
    return PeakSampler(lambda: rss(pid))
