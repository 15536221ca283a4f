"""Logging set-up: one JSON object per line (for log pipelines) or plain text (for people).

Tracebacks are rate-limited per kind (logger, exception type, plugin, phase and the line that raised):
a plugin failing on every request under load would otherwise write thousands of identical tracebacks a
second. Past the budget a line keeps its message and error id but loses its traceback, and says how many
tracebacks of its kind were suppressed in the current window.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["TracebackLimiter", "log_plugin_failure", "setup_logging"]

#: Tracebacks of one kind logged in full per window, the window in seconds, and the kinds remembered.
TRACEBACK_BURST = 5
TRACEBACK_WINDOW = 60.0
_MAX_KINDS = 256

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _origin(tb: TracebackType | None) -> tuple[str, int]:
    """Where the exception was raised: the innermost frame of its traceback."""
    if tb is None:
        return "", 0
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename, tb.tb_lineno


class TracebackLimiter(logging.Filter):
    """At most `burst` tracebacks of one kind per `window` seconds; later records of that kind lose their
    traceback (the line itself stays: it carries the error id a client was given) and count as suppressed."""

    def __init__(
        self,
        burst: int = TRACEBACK_BURST,
        window: float = TRACEBACK_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        # kind -> [window start, tracebacks logged in it, tracebacks suppressed in it]
        self._kinds: dict[tuple[Any, ...], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        exc = record.exc_info[1]
        kind = (
            record.name,
            type(exc).__qualname__,
            getattr(record, "plugin", None),
            getattr(record, "phase", None),
            *_origin(exc.__traceback__),
        )
        now = self.clock()
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.window:
            earlier = int(state[2]) if state is not None else 0
            if state is None and len(self._kinds) >= _MAX_KINDS:
                del self._kinds[next(iter(self._kinds))]  # the oldest kind; it starts afresh if seen again
            state = self._kinds[kind] = [now, 0, 0]
            if earlier:  # what the last window hid, said once with the next traceback shown
                record.tracebacks_suppressed = earlier
                record.msg = f"{record.msg} ({earlier} similar tracebacks were suppressed)"
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        record.exc_info = None
        record.exc_text = None
        record.tracebacks_suppressed = int(state[2])
        record.msg = f"{record.msg} (traceback suppressed: {int(state[2])} of this kind since the last one shown)"
        return True


def log_plugin_failure(
    logger: logging.Logger, chain: str, phase: str, plugin: str, exc: BaseException, request_id: str
) -> str:
    """One line for a plugin that failed in a hook (traceback attached, rate-limited per kind above), under a
    fresh error id: the id the client's reply carries, so the two can be matched."""
    error_id = uuid.uuid4().hex[:16]
    logger.error(
        "plugin %s failed in %s (chain %s, error id %s): %s: %s",
        plugin,
        phase,
        chain,
        error_id,
        type(exc).__name__,
        exc,
        exc_info=exc,
        extra={"error_id": error_id, "plugin": plugin, "phase": phase, "request_id": request_id},
    )
    return error_id


def setup_logging(fmt: str = "json", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TracebackLimiter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("sidecar")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # OpenTelemetry's own warnings (an exporter that cannot reach its collector) go through the same
    # formatted handler, never Python's last-resort one. Its trace-context parsing warns about what a
    # client sent, once per request and quoting it: that is the client's business, not the log's.
    otel = logging.getLogger("opentelemetry")
    otel.handlers[:] = [handler]
    otel.setLevel(logging.WARNING)
    otel.propagate = False
    logging.getLogger("opentelemetry.trace").setLevel(logging.ERROR)
