"""What one ext_proc stream did, for its access log line and its trace.

The server builds a `StreamRecord` only when tracing or the access log is on; otherwise the processor
reports to the process's `Metrics` directly and no stream pays for either. A record forwards every
number to `Metrics` and keeps what the stream did: which plugins ran, in which phase, how long, with what
outcome. Spans are made after the fact, with the times measured on the hot path: a phase's span and its
plugins' spans when Envoy's message is answered, the stream's span when the stream ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sidecar.plugins import Respond

if TYPE_CHECKING:
    from sidecar.extproc.metrics import Metrics
    from sidecar.extproc.tracing import Tracing
    from sidecar.plugins import Context

__all__ = ["StreamRecord", "access_log"]

access_log = logging.getLogger("sidecar.access")

#: Plugin calls a record keeps for one stream's access line (a long STREAMED body calls hooks per chunk).
MAX_RECORDED_CALLS = 64
#: Phase spans one stream makes (a STREAMED body is a message per chunk); later phases are counted only.
MAX_PHASE_SPANS = 64
#: Characters of the request id (the client's x-request-id) in an access line or span.
MAX_REQUEST_ID = 128


class StreamRecord:
    """One stream's plugins, outcome and spans; forwards every count to the process's Metrics."""

    def __init__(
        self,
        metrics: Metrics | None,
        chain: str,
        *,
        tracing: Tracing | None,
        access: bool,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.metrics = metrics
        self.chain = chain
        self.tracing = tracing
        self.access = access
        self.metadata = metadata or {}
        self.ctx: Context | None = None
        self.started_ns = time.time_ns()
        self._started = time.perf_counter()
        self.plugins: list[str] = []  # each plugin once, in the order they first ran
        self.status: int | None = None
        self.responder: str | None = None
        self.error_id: str | None = None
        self.calls = 0
        #: Envoy reset the stream while a message was being answered (its message_timeout).
        self.cancelled = False
        self._phase_spans_made = 0
        self._plugin_spans_dropped = 0  # past MAX_RECORDED_CALLS in a phase, or under a dropped phase
        # A phase's plugin calls, for spans: plugin, outcome, start ns, end ns, phase, error id.
        self._pending: list[list[Any]] = []
        self._span: Any = None
        self._span_context: Any = None

    # -- what the lifetime and processor report (the Metrics interface) -------------------------

    def stream_opened(self, chain: str) -> None:
        if self.metrics is not None:
            self.metrics.stream_opened(chain)

    def stream_closed(self) -> None:
        if self.metrics is not None:
            self.metrics.stream_closed()

    def stream_error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.stream_error(reason)
        if reason == "cancelled":
            self.cancelled = True

    def plugin_error(self, plugin: str, phase: str, error_id: str = "") -> None:
        if self.metrics is not None:
            self.metrics.plugin_error(plugin, phase, error_id)
        self.error_id = error_id
        if self._pending and self._pending[-1][0] == plugin:
            self._pending[-1][5] = error_id

    def plugin_ran(self, plugin: str, phase: str, seconds: float, outcome: object = None) -> None:
        if self.metrics is not None:
            self.metrics.plugin_ran(plugin, phase, seconds, outcome)
        self.calls += 1
        if plugin not in self.plugins and len(self.plugins) < MAX_RECORDED_CALLS:
            self.plugins.append(plugin)
        if isinstance(outcome, Respond):
            self.status, self.responder = outcome.status, plugin
            result = f"respond {outcome.status}"
        elif isinstance(outcome, BaseException):
            result = "error"
        else:
            result = "continue"
        if self.tracing is not None:
            if len(self._pending) < MAX_RECORDED_CALLS:
                end = time.time_ns()
                self._pending.append([plugin, result, end - int(seconds * 1e9), end, phase, None])
            else:
                self._plugin_spans_dropped += 1

    def observe(self, phase: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(phase, seconds)
        if self.tracing is not None:
            self._phase_spans_made += 1
            if self._phase_spans_made <= MAX_PHASE_SPANS:
                self._phase_spans(phase, seconds)
            else:
                self._plugin_spans_dropped += len(self._pending)
                self._pending.clear()

    # -- spans ----------------------------------------------------------------------------------

    def _carrier(self) -> Mapping[str, str]:
        if "traceparent" in self.metadata:
            return self.metadata
        headers = self.ctx.request_headers if self.ctx is not None else None
        if headers is not None and "traceparent" in headers:
            carrier = {"traceparent": headers["traceparent"]}
            if "tracestate" in headers:
                carrier["tracestate"] = headers["tracestate"]
            return carrier
        return {}

    def _stream_span(self) -> Any:
        if self._span is None:
            assert self.tracing is not None
            self._span = self.tracing.tracer.start_span(
                "ext_proc " + self.chain,
                context=self.tracing.parent(self._carrier()),
                kind=self.tracing.server_kind,
                start_time=self.started_ns,
                attributes={"sidecar.chain": self.chain},
            )
            self._span_context = self.tracing.in_context(self._span)
        return self._span_context

    def _phase_spans(self, phase: str, seconds: float) -> None:
        try:
            tracing = self.tracing
            assert tracing is not None
            parent = self._stream_span()
            if not self._span.is_recording():  # not sampled (say, Envoy's traceparent says so): no children
                self._pending.clear()
                return
            end = time.time_ns()
            span = tracing.tracer.start_span(
                phase,
                context=parent,
                kind=tracing.internal_kind,
                start_time=end - int(seconds * 1e9),
                attributes={"sidecar.chain": self.chain, "sidecar.phase": phase},
            )
            inside = tracing.in_context(span)
            for plugin, result, start, stop, plugin_phase, error_id in self._pending:
                attributes: dict[str, Any] = {
                    "sidecar.chain": self.chain,
                    "sidecar.plugin": plugin,
                    "sidecar.phase": plugin_phase,
                    "sidecar.outcome": result,
                }
                if result.startswith("respond"):
                    attributes["sidecar.respond.status"] = int(result.split()[1])
                if error_id:
                    attributes["sidecar.error_id"] = error_id
                child = tracing.tracer.start_span(
                    f"{plugin_phase} {plugin}", context=inside, start_time=start, attributes=attributes
                )
                if result == "error":
                    child.set_status(tracing.error_status)
                child.end(end_time=stop)
            self._pending.clear()
            span.end(end_time=end)
        except Exception as exc:  # tracing never fails a request
            logging.getLogger("sidecar.tracing").debug("span dropped: %s", exc)

    # -- the end --------------------------------------------------------------------------------

    def outcome(self, failure: str | None) -> str:
        if failure is not None:
            return failure
        if self.error_id is not None:
            return "plugin_error"
        if self.status is not None:
            return "respond"
        return "ok"

    def finish(self, failure: str | None = None) -> None:
        """The stream is over: `failure` names how it failed (protocol, stream, cancelled, internal), None if not."""
        outcome = self.outcome(failure)
        duration = time.perf_counter() - self._started
        if self.tracing is not None:
            try:
                self._stream_span()
                self._span.set_attribute("sidecar.outcome", outcome)
                if self.ctx is not None and self.ctx.request_id:
                    self._span.set_attribute("sidecar.request_id", self.ctx.request_id[:MAX_REQUEST_ID])
                if self.status is not None:
                    self._span.set_attribute("sidecar.respond.status", self.status)
                if self.error_id is not None:
                    self._span.set_attribute("sidecar.error_id", self.error_id)
                if self._phase_spans_made > MAX_PHASE_SPANS:
                    self._span.set_attribute("sidecar.phase_spans_dropped", self._phase_spans_made - MAX_PHASE_SPANS)
                if self._plugin_spans_dropped:
                    self._span.set_attribute("sidecar.plugin_spans_dropped", self._plugin_spans_dropped)
                if failure is not None or self.error_id is not None:
                    self._span.set_status(self.tracing.error_status)
                self._span.end()
            except Exception as exc:
                logging.getLogger("sidecar.tracing").debug("span dropped: %s", exc)
        if self.access:
            extra: dict[str, Any] = {
                "request_id": self.ctx.request_id[:MAX_REQUEST_ID] if self.ctx and self.ctx.request_id else None,
                "chain": self.chain,
                "plugins": self.plugins,
                "outcome": outcome,
                "duration_ms": round(duration * 1000, 3),
                "hook_calls": self.calls,
            }
            if self.status is not None:
                extra["status"] = self.status
                extra["responder"] = self.responder
            if self.error_id is not None:
                extra["error_id"] = self.error_id
            access_log.info("ext_proc stream %s: %s in %.1f ms", self.chain, outcome, duration * 1000, extra=extra)
