"""Metrics a plugin defines: `Counter`, `Gauge`, `Histogram`, summed across worker processes.

A plugin's own prometheus_client objects live in one worker and are never scraped with `--workers N`
(the supervisor serves the metrics). These instruments are plain numbers in the process that serving
publishes with the server's own metrics, so `--workers 2` shows the sum like the built-in ones:

    from sidecar import Counter

    REJECTED = Counter("ratelimit_rejected", "Requests over their tenant's rate", labels=("tenant",))

    class RateLimit(Plugin):
        def on_request_headers(self, ctx, headers):
            ...
            REJECTED.inc(tenant=tenant)

Declaring the same name twice with the same kind and labels gives the same numbers (a plugin used in two
chains); a different kind or labels is a ConfigError. Names may not start with `sidecar_`, `process_`
or `python_` (the server's and prometheus_client's own). Each instrument keeps at most `MAX_SERIES` label
sets: past that an update is dropped and counted in `sidecar_plugin_metric_series_dropped_total`, so a
label fed from request data cannot grow without bound.
Gauges are summed over the live workers (a gauge per worker, like open connections).
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_left
from typing import Any

from sidecar.errors import ConfigError

__all__ = [
    "MAX_INSTRUMENTS",
    "MAX_PROCESS_SERIES",
    "MAX_SERIES",
    "Counter",
    "Gauge",
    "Histogram",
    "declared",
    "snapshot",
]

#: Label sets one instrument keeps; updates for more are dropped and counted.
MAX_SERIES = 1000
#: Instruments one process may declare (a name built from request data would otherwise grow forever).
MAX_INSTRUMENTS = 1000
#: Label sets all instruments of one process keep together: the snapshot a worker publishes every second
#: stays small. Updates for more are dropped and counted like those past MAX_SERIES.
MAX_PROCESS_SERIES = 10_000
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]{0,199}")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]{0,99}")
# The server's own families and prometheus_client's default ones.
_RESERVED_PREFIXES = ("sidecar_", "process_", "python_")
_RESERVED_LABELS = frozenset({"le", "worker"})
_MAX_LABEL_VALUE = 256

_declared: dict[str, _Instrument] = {}
_series_kept = [0]  # label sets over every instrument of this process


class _Instrument:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] | list[str] = ()) -> None:
        labels = tuple(labels)
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith(_RESERVED_PREFIXES):
            raise ConfigError(
                f"metric name {name!r}: expected [a-zA-Z_][a-zA-Z0-9_]*, not starting with "
                + ", ".join(_RESERVED_PREFIXES)
            )
        for label in labels:
            if not isinstance(label, str) or not _LABEL.fullmatch(label) or label in _RESERVED_LABELS:
                raise ConfigError(f"metric {name}: label {label!r} is not a usable label name")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"metric {name}: labels {labels!r} repeat a name")
        self.name = name
        self.help = str(help)
        self.labels = labels
        self._dropped = [0]  # shared with a second declaration of the same name, like the series
        self._series: dict[tuple[str, ...], Any] = {}
        # Each series' key as published (a JSON list), made once when the series is: publishing is per second.
        self._published_keys: dict[tuple[str, ...], str] = {}
        existing = _declared.get(name)
        if existing is not None:
            if existing.kind != self.kind or existing.labels != labels or existing._shape() != self._shape():
                raise ConfigError(
                    f"metric {name}: declared twice, as a {existing.kind} with labels {list(existing.labels)} and "
                    f"as a {self.kind} with labels {list(labels)}"
                )
            self._series = existing._series  # one set of numbers, whichever object a plugin holds
            self._published_keys = existing._published_keys
            self._dropped = existing._dropped
        else:
            if len(_declared) >= MAX_INSTRUMENTS:
                raise ConfigError(
                    f"metric {name}: this process already has {MAX_INSTRUMENTS} metrics, the most it keeps"
                )
            _declared[name] = self

    def _shape(self) -> tuple[float, ...]:
        return ()

    def _key(self, values: dict[str, str]) -> tuple[str, ...] | None:
        """The series for these label values; None when the instrument is full (the update is dropped)."""
        if len(values) != len(self.labels):
            raise ValueError(f"metric {self.name}: expected labels {list(self.labels)}, got {sorted(values)}")
        try:
            key = tuple(str(values[label])[:_MAX_LABEL_VALUE] for label in self.labels)
        except KeyError:
            raise ValueError(f"metric {self.name}: expected labels {list(self.labels)}, got {sorted(values)}") from None
        if key not in self._series:
            if len(self._series) >= MAX_SERIES or _series_kept[0] >= MAX_PROCESS_SERIES:
                self._dropped[0] += 1
                return None
            _series_kept[0] += 1  # the caller adds the series now
            # A JSON list, not a joined string: any character a label value holds stays in its own label.
            self._published_keys[key] = json.dumps(key)
        return key

    def _values(self) -> dict[str, Any]:
        # Copies: the snapshot is serialised in another thread while hooks keep updating.
        keys = self._published_keys  # an unlabelled instrument's one series, (), has none: "[]"
        series = self._series.items()
        return {keys.get(key) or "[]": list(value) if isinstance(value, list) else value for key, value in series}

    def snapshot(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "help": self.help,
            "labels": list(self.labels),
            "series": self._values(),
            "dropped": self._dropped[0],
        }


def _number(amount: float, name: str) -> float:
    value = float(amount)
    if not math.isfinite(value):
        raise ValueError(f"metric {name}: {amount!r} is not a finite number")
    return value


class Counter(_Instrument):
    """A count that only goes up (`inc`)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        value = _number(amount, self.name)
        if value < 0:
            raise ValueError(f"metric {self.name}: a counter cannot go down ({amount!r})")
        key = self._key(labels) if labels or self.labels else ()
        if key is not None:
            self._series[key] = self._series.get(key, 0.0) + value


class Gauge(_Instrument):
    """A value that goes up and down (`set`, `inc`, `dec`); the scrape shows the sum over live workers."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels) if labels or self.labels else ()
        if key is not None:
            self._series[key] = _number(value, self.name)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels) if labels or self.labels else ()
        if key is not None:
            self._series[key] = self._series.get(key, 0.0) + _number(amount, self.name)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-_number(amount, self.name), **labels)


class Histogram(_Instrument):
    """Observations in buckets (`observe`), with their count and sum."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: tuple[str, ...] | list[str] = (),
        buckets: tuple[float, ...] | list[float] = DEFAULT_BUCKETS,
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or any(not math.isfinite(b) for b in bounds) or list(bounds) != sorted(set(bounds)):
            raise ConfigError(f"metric {name}: buckets must be finite, increasing and not empty, got {list(buckets)}")
        if len(bounds) > 50:
            raise ConfigError(f"metric {name}: at most 50 buckets, got {len(bounds)}")
        self.buckets = bounds
        super().__init__(name, help, labels)

    def _shape(self) -> tuple[float, ...]:
        return self.buckets

    def observe(self, value: float, **labels: str) -> None:
        amount = _number(value, self.name)
        key = self._key(labels) if labels or self.labels else ()
        if key is None:
            return
        counts = self._series.get(key)
        if counts is None:
            counts = self._series[key] = [0] * (len(self.buckets) + 1) + [0.0]  # buckets, +Inf, then the sum
        counts[bisect_left(self.buckets, amount)] += 1
        counts[-1] += amount

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "buckets": list(self.buckets)}


def declared() -> dict[str, _Instrument]:
    """Every instrument declared in this process, by name."""
    return dict(_declared)


def snapshot() -> dict[str, dict[str, Any]]:
    """This process's instruments as plain data (what a worker publishes for its supervisor)."""
    return {name: instrument.snapshot() for name, instrument in _declared.items()}
