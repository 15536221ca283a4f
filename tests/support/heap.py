"""Envoy's heap while something runs: the peak of admin `/memory`'s `allocated`, sampled every 20 ms."""

from __future__ import annotations

import json
import threading

from sidecar.stack.envoy import Envoy


class EnvoyHeap:
    """`with EnvoyHeap(envoy) as heap: ...`, then `heap.grew`: how far the peak rose above the start, bytes.

    `allocated` is tcmalloc's count of bytes handed out, so it follows what Envoy holds (buffers, copies)
    rather than what the allocator keeps mapped, as RSS would."""

    def __init__(self, envoy: Envoy, interval: float = 0.02) -> None:
        self.envoy = envoy
        self.interval = interval
        self.start = self.peak = self.allocated()
        self._stop = threading.Event()
        self.failed: Exception | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def allocated(self) -> int:
        return int(json.loads(self.envoy.admin("/memory"))["allocated"])

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self.allocated())
        except Exception as exc:  # a peak that stopped being sampled would pass any bound: `grew` raises instead
            self.failed = exc

    def __enter__(self) -> EnvoyHeap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.allocated())

    @property
    def grew(self) -> int:
        if self.failed is not None:
            raise AssertionError(f"Envoy's heap was not sampled to the end: {self.failed!r}")
        return self.peak - self.start
