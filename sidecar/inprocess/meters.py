"""What the in-process bridge counts: the ext_proc server's per-plugin numbers, in the same snapshot shape.

Inside Envoy there is no sidecar HTTP port. These are plain numbers bumped on the hot path (no locks: every
bump happens under the GIL); `snapshot()` gives the keys `sidecar.extproc.metrics.Metrics.snapshot()` gives
for streams and plugins, so whatever serves the sidecar's metrics (its collector, `merge`) can serve these.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from sidecar import instruments
from sidecar.plugins import Respond
from sidecar.wire import PHASES

__all__ = ["BUCKETS", "Meters"]

#: The ext_proc server's latency buckets (seconds), so both backends' histograms line up.
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class Meters:
    """The numbers one Envoy process's bridge keeps, over all its in-process filters."""

    def __init__(self) -> None:
        #: Per chain: [streams opened, streams closed] (a filter bumps its chain's list directly).
        self.stream_counts: dict[str, list[int]] = {}
        self.plugin_errors: dict[str, int] = {}  # "plugin\0phase" -> count
        self.stream_errors: dict[str, int] = {}
        # (plugin, phase) -> a count per bucket, +Inf, then the sum of seconds: one hook call each.
        self.plugin_latency: dict[tuple[str, str], list[float]] = {}
        self.responses: dict[tuple[str, int], int] = {}  # (plugin, status) -> Responds returned
        #: Header changes dropped by Envoy's default mutation rules (as ext_proc's rejected_header_mutations).
        self.rejected_mutations = 0
        #: Async phases the watchdog had to settle (their loop was blocked or their hook ignored cancellation).
        self.backstops = 0

    def streams_of(self, chain: str) -> list[int]:
        """The [opened, closed] counters of a chain's streams, to bump without a lookup per stream."""
        return self.stream_counts.setdefault(chain, [0, 0])

    @property
    def streams(self) -> dict[str, int]:
        return {chain: counts[0] for chain, counts in self.stream_counts.items()}

    @property
    def active(self) -> int:
        return sum(opened - closed for opened, closed in self.stream_counts.values())

    def cell(self, plugin: str, phase: str) -> list[float]:
        """The latency histogram of one plugin in one phase (a count per bucket, +Inf, the sum of seconds),
        to bump in place: `cell[bisect_left(BUCKETS, seconds)] += 1; cell[-1] += seconds`."""
        counts = self.plugin_latency.get((plugin, phase))
        if counts is None:
            counts = self.plugin_latency[(plugin, phase)] = [0] * (len(BUCKETS) + 1) + [0.0]
        return counts

    def plugin_error(self, plugin: str, phase: str, error_id: str = "") -> None:
        key = f"{plugin}\0{phase}"
        self.plugin_errors[key] = self.plugin_errors.get(key, 0) + 1

    def plugin_ran(self, plugin: str, phase: str, seconds: float, outcome: object = None) -> None:
        counts = self.cell(plugin, phase)
        counts[bisect_left(BUCKETS, seconds)] += 1
        counts[-1] += seconds
        if isinstance(outcome, Respond):
            key = (plugin, outcome.status)
            self.responses[key] = self.responses.get(key, 0) + 1

    def stream_error(self, reason: str) -> None:
        self.stream_errors[reason] = self.stream_errors.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "streams": dict(self.streams),
            "active": self.active,
            "latency": {phase: [0] * (len(BUCKETS) + 1) for phase in PHASES},
            "latency_sum": dict.fromkeys(PHASES, 0.0),
            "plugin_errors": dict(self.plugin_errors),
            "stream_errors": dict(self.stream_errors),
            "plugin_latency": {f"{p}\0{ph}": list(counts) for (p, ph), counts in self.plugin_latency.items()},
            "responses": {f"{p}\0{status}": count for (p, status), count in self.responses.items()},
            "instruments": instruments.snapshot(),
            "inprocess": {"rejected_mutations": self.rejected_mutations, "backstops": self.backstops},
        }
