"""OpenTelemetry tracing of ext_proc streams (the optional `otel` extra).

Spans join the trace Envoy started: Envoy's gRPC client puts a W3C `traceparent` in the initial metadata
of the ext_proc stream when its own tracer is on; without one, the `traceparent` of the HTTP request
headers is used; without either, the stream starts a trace of its own. The OTLP gRPC exporter reads the
standard `OTEL_*` variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, _HEADERS,
_TIMEOUT, _INSECURE, OTEL_SERVICE_NAME, OTEL_BSP_MAX_QUEUE_SIZE ...).

Tracing must never fail a request: spans are handed to a batch processor whose queue is bounded
(OTEL_BSP_MAX_QUEUE_SIZE, default 2048 spans); when the collector is down or slow the exporter thread
retries within its timeout and the spans that do not fit are dropped. Nothing on the event loop waits for
the collector.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from sidecar.errors import ConfigError

__all__ = ["SERVICE_NAME", "Tracing", "check_installed", "check_settings"]

log = logging.getLogger("sidecar.tracing")

SERVICE_NAME = "envoy-sidecar"
_WHOLE_NUMBERS = (
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
)
#: Seconds `shutdown` gives the exporter to send what is queued; past them the rest is abandoned.
_FLUSH_SECONDS = 5.0
#: A W3C traceparent is 55 characters (version 00); tracestate at most 32 members, 512 characters.
_MAX_TRACEPARENT = 55
_MAX_TRACESTATE = 512
#: Characters of an OpenTelemetry error quoted in a ConfigError (it may echo a long setting).
_MAX_QUOTED = 200


def check_installed() -> None:
    """ConfigError unless the `otel` extra is installed (checked once, before workers start)."""
    for module in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a parent package is missing
            found = False
        if not found:
            raise ConfigError(_MISSING)


def check_settings() -> None:
    """ConfigError unless tracing can start with this environment's OTEL_* settings: run once by a
    supervisor before it starts workers, so a bad setting is one line and exit 2, not N workers
    exiting and being restarted forever."""
    check_installed()
    Tracing().shutdown()


_MISSING = "tracing: OpenTelemetry is not installed; install the extra: pip install 'envoy-sidecar[otel]'"


class Tracing:
    """This process's tracer provider, batch processor and OTLP exporter."""

    def __init__(self, exporter: Any = None) -> None:
        try:
            from opentelemetry.propagators.textmap import DefaultGetter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            raise ConfigError(_MISSING) from None
        for name in _WHOLE_NUMBERS:  # the SDK logs a traceback and falls back to its default: say it once, here
            value = os.environ.get(name)
            if value is not None and not value.strip().isdigit():
                raise ConfigError(f"tracing: {name}: expected a whole number, got {value[:40]!r}")
        try:
            if exporter is None:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter()
            attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
            # No atexit flush of its own: it would drain the queue with no time bound (`shutdown` has one).
            self.provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        except Exception as exc:  # the SDK and the exporter check OTEL_*, each with exceptions of its own
            detail = str(exc)[:_MAX_QUOTED] or type(exc).__name__
            raise ConfigError(f"tracing: the OTEL_* settings do not work: {detail}") from None
        self.tracer = self.provider.get_tracer("envoy-sidecar")
        self._propagator = TraceContextTextMapPropagator()
        self._getter = DefaultGetter()
        self.server_kind = SpanKind.SERVER
        self.internal_kind = SpanKind.INTERNAL
        self.error_status = Status(StatusCode.ERROR)
        self.in_context = set_span_in_context

    def parent(self, carrier: Mapping[str, str]) -> Any:
        """The context a `traceparent` (and `tracestate`) in `carrier` names; an empty one otherwise."""
        traceparent = carrier.get("traceparent")
        if traceparent is None or len(traceparent) > _MAX_TRACEPARENT:
            return None  # not a W3C traceparent: the stream starts a trace of its own
        fields = {"traceparent": traceparent}
        tracestate = carrier.get("tracestate")
        if tracestate is not None and len(tracestate) <= _MAX_TRACESTATE:
            fields["tracestate"] = tracestate  # a longer one is dropped; the parent still counts
        return self._propagator.extract(fields, getter=self._getter)

    def shutdown(self) -> None:
        """Send what is queued within _FLUSH_SECONDS, then abandon the rest: a collector that is down or
        slow cannot hold the exit up. The SDK's shutdown waits for the exporter with no bound, so it runs
        in a daemon thread this waits for only as long as the budget lasts."""
        done = threading.Event()

        def flush_and_stop() -> None:
            try:
                self.provider.force_flush(int(_FLUSH_SECONDS * 1000))
                self.provider.shutdown()
            except Exception as exc:  # an exporter's failure is never the server's
                log.warning("tracing: could not flush spans at exit: %s", exc)
            finally:
                done.set()

        threading.Thread(target=flush_and_stop, name="tracing-shutdown", daemon=True).start()
        if not done.wait(_FLUSH_SECONDS):
            log.warning("tracing: the collector did not take the queued spans within %.0f s: dropped", _FLUSH_SECONDS)
