"""Spans of the in-process server: one per stream, a child per phase and per plugin, joined to the caller's
trace; and tracing never failing a request (malformed context, collector down, OpenTelemetry missing)."""

from __future__ import annotations

import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.chains import Registry
from sidecar.config import TRANSPORTS, ChainSpec, PluginSpec, SidecarConfig
from sidecar.errors import ConfigError
from sidecar.extproc.record import MAX_PHASE_SPANS
from sidecar.extproc.server import ExtProcServer
from sidecar.extproc.tracing import Tracing
from tests.support.messages import headers_message
from tests.support.meterplugins import MP
from tests.support.net import free_port
from tests.support.testplugins import TP

pytestmark = pytest.mark.asyncio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def response_headers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap()))


async def _server(tmp_path: Path, transport: str, tracing: Tracing) -> AsyncIterator[ExtProcServer]:
    specs = (ChainSpec("default", (PluginSpec(f"{MP}Metered"), PluginSpec(f"{TP}AddHeaders"))),)
    sock = tmp_path / "s.sock"
    config = SidecarConfig(listen=f"unix:{sock}", transport=transport, tracing=False)
    server = ExtProcServer(Registry.from_specs(specs), config, socket_path=sock)
    server._tracing, server._recording = tracing, True  # the exporter the test reads
    await server.start()
    try:
        yield server
    finally:
        await server.stop(1)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest_asyncio.fixture(params=TRANSPORTS)
async def traced(
    tmp_path: Path, request: pytest.FixtureRequest, exporter: InMemorySpanExporter
) -> AsyncIterator[tuple[ExtProcServer, Tracing]]:
    tracing = Tracing(exporter=exporter)
    async for server in _server(tmp_path, request.param, tracing):
        yield server, tracing


async def _call(server: ExtProcServer, messages: list[pb.ProcessingRequest], metadata: Any = ()) -> list[Any]:
    async with grpc.aio.insecure_channel(f"unix:{server.socket_path}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process(iter(messages), metadata=metadata, timeout=5)
        return [reply async for reply in call]


def _finished(tracing: Tracing, exporter: InMemorySpanExporter) -> list[Any]:
    tracing.provider.force_flush(5000)
    return list(exporter.get_finished_spans())


async def test_a_stream_joins_the_trace_in_its_grpc_metadata(
    traced: tuple[ExtProcServer, Tracing], exporter: InMemorySpanExporter
) -> None:
    server, tracing = traced
    await _call(server, [headers_message(("x-request-id", b"r1")), response_headers()], (("traceparent", TRACEPARENT),))
    spans = _finished(tracing, exporter)
    (stream,) = [s for s in spans if s.name == "ext_proc default"]
    assert f"{stream.context.trace_id:032x}" == TRACE_ID
    assert f"{stream.parent.span_id:016x}" == PARENT_ID
    assert stream.attributes["sidecar.outcome"] == "ok"
    assert stream.attributes["sidecar.request_id"] == "r1"
    phases = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == stream.context.span_id}
    assert set(phases) == {"request_headers", "response_headers"}
    plugins = [
        s for s in spans if s.parent is not None and s.parent.span_id == phases["request_headers"].context.span_id
    ]
    assert [s.attributes["sidecar.plugin"] for s in plugins] == ["metered", "add-headers"]
    assert all(s.attributes["sidecar.outcome"] == "continue" for s in plugins)
    assert all(s.context.trace_id == stream.context.trace_id for s in spans)
    assert all(stream.start_time <= s.start_time <= s.end_time <= stream.end_time for s in spans)


async def test_respond_and_errors_are_span_attributes(
    traced: tuple[ExtProcServer, Tracing], exporter: InMemorySpanExporter
) -> None:
    server, tracing = traced
    await _call(server, [headers_message(("x-deny", b"1"), ("traceparent", TRACEPARENT.encode()))])
    (boom,) = await _call(server, [headers_message(("x-boom", b"1"))])
    error_id = next(
        h.header.raw_value for h in boom.immediate_response.headers.set_headers if h.header.key == "x-sidecar-error-id"
    )
    spans = _finished(tracing, exporter)
    denied, failed = [s for s in spans if s.name == "ext_proc default"]
    # No metadata: the request's own traceparent is the parent.
    assert f"{denied.context.trace_id:032x}" == TRACE_ID
    assert denied.attributes["sidecar.outcome"] == "respond"
    assert denied.attributes["sidecar.respond.status"] == 401
    (deny_plugin,) = [
        s for s in spans if s.name == "request_headers metered" and s.context.trace_id == denied.context.trace_id
    ]
    assert deny_plugin.attributes["sidecar.outcome"] == "respond 401"
    assert deny_plugin.attributes["sidecar.respond.status"] == 401
    assert f"{failed.context.trace_id:032x}" != TRACE_ID  # no context at all: a trace of its own
    assert failed.attributes["sidecar.outcome"] == "plugin_error"
    assert failed.attributes["sidecar.error_id"] == error_id.decode()
    assert not failed.status.is_ok
    (failed_plugin,) = [
        s for s in spans if s.name == "request_headers metered" and s.context.trace_id == failed.context.trace_id
    ]
    assert failed_plugin.attributes["sidecar.error_id"] == error_id.decode()


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
        "ff-" + TRACE_ID + "-" + PARENT_ID + "-01",
        "00-" + "x" * 5000,
    ],
)
async def test_a_malformed_traceparent_starts_a_new_trace(
    traced: tuple[ExtProcServer, Tracing], exporter: InMemorySpanExporter, traceparent: str
) -> None:
    server, tracing = traced
    (reply,) = await _call(server, [headers_message()], (("traceparent", traceparent),))
    assert reply.HasField("request_headers")
    (stream,) = [s for s in _finished(tracing, exporter) if s.name == "ext_proc default"]
    assert stream.parent is None
    assert stream.context.trace_id != 0


async def test_a_collector_that_is_down_never_fails_a_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    tracing = Tracing()
    async for server in _server(tmp_path, "native", tracing):
        for _ in range(50):
            (reply,) = await _call(server, [headers_message()])
            assert reply.HasField("request_headers")


class _StuckExporter(SpanExporter):
    """A collector that takes the first batch and never answers (until the test lets it go)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        self.release.wait(10)
        return SpanExportResult.SUCCESS


async def test_spans_past_the_bounded_queue_are_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "16")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    exporter = _StuckExporter()
    tracing = Tracing(exporter=exporter)
    streams = 100
    async for server in _server(tmp_path, "native", tracing):
        for _ in range(streams):  # 4 spans each: a stream, its phase and two plugins
            (reply,) = await _call(server, [headers_message()])
            assert reply.HasField("request_headers")
        exporter.release.set()
    tracing.provider.force_flush(5000)
    assert 0 < exporter.exported <= 8 * 3 + 16  # what was in flight, plus the queue: the rest were dropped
    assert exporter.exported < streams * 4


async def test_tracing_without_opentelemetry_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ConfigError, match=r"pip install 'envoy-sidecar\[otel\]'"):
        Tracing()
    config = SidecarConfig(tracing=True)
    with pytest.raises(ConfigError, match="tracing: OpenTelemetry is not installed"):
        ExtProcServer(
            Registry.from_specs((ChainSpec("default", (PluginSpec(f"{TP}AddHeaders"),)),)), config, socket_path=None
        )


async def test_otel_settings_that_cannot_work_are_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")  # smaller than the default export batch (512)
    with pytest.raises(ConfigError, match="tracing: the OTEL_\\* settings do not work"):
        Tracing(exporter=InMemorySpanExporter())
    for value in ("abc", "-1", "1e3", "x" * 1000):
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", value)
        with pytest.raises(ConfigError, match="OTEL_BSP_SCHEDULE_DELAY: expected a whole number") as raised:
            Tracing(exporter=InMemorySpanExporter())
        assert len(str(raised.value)) < 120


async def test_an_unsampled_parent_gets_no_spans(
    traced: tuple[ExtProcServer, Tracing], exporter: InMemorySpanExporter
) -> None:
    server, tracing = traced
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"  # Envoy did not sample this request
    (reply,) = await _call(server, [headers_message()], (("traceparent", unsampled),))
    assert reply.HasField("request_headers")
    assert _finished(tracing, exporter) == []


async def test_workers_refuse_tracing_without_opentelemetry_before_they_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from sidecar.extproc.tracing import check_installed

    check_installed()  # installed here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match="pip install 'envoy-sidecar\\[otel\\]'"):
        check_installed()


async def test_a_long_streamed_body_makes_a_bounded_number_of_spans(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    tracing = Tracing(exporter=exporter)
    specs = (ChainSpec("default", (PluginSpec(f"{TP}StreamPass"),)),)
    sock = tmp_path / "s.sock"
    server = ExtProcServer(Registry.from_specs(specs), SidecarConfig(listen=f"unix:{sock}"), socket_path=sock)
    server._tracing, server._recording = tracing, True
    await server.start()
    try:
        chunks = [pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x", end_of_stream=i == 499)) for i in range(500)]
        replies = await _call(server, [headers_message(), *chunks])
        assert len(replies) == 501
    finally:
        await server.stop(1)
    spans = _finished(tracing, exporter)
    (stream,) = [s for s in spans if s.name == "ext_proc default"]
    assert stream.attributes["sidecar.phase_spans_dropped"] == 501 - MAX_PHASE_SPANS
    assert stream.attributes["sidecar.plugin_spans_dropped"] == 501 - MAX_PHASE_SPANS  # theirs too
    assert len(spans) <= 1 + MAX_PHASE_SPANS * 2  # each phase span and its one plugin span


class _DeadCollector(SpanExporter):
    """Every export blocks, as the OTLP exporter does against a collector that is down, until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exporting = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exporting += 1
        self.release.wait(10)
        self.exporting -= 1
        return SpanExportResult.FAILURE


async def test_shutdown_abandons_spans_a_dead_collector_does_not_take(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.extproc import tracing as tracing_module

    monkeypatch.setattr(tracing_module, "_FLUSH_SECONDS", 0.2)
    exporter = _DeadCollector()
    tracing = Tracing(exporter=exporter)
    for i in range(3000):  # several batches: the SDK's shutdown would export each, one timeout apiece
        tracing.tracer.start_span(f"s{i}").end()
    try:
        tracing.shutdown()
        # It returned while the exporter is still stuck in a batch: the rest was abandoned.
        assert exporter.exporting == 1
    finally:
        exporter.release.set()


async def test_no_unbounded_flush_is_left_for_interpreter_exit() -> None:
    tracing = Tracing(exporter=InMemorySpanExporter())
    assert tracing.provider._atexit_handler is None  # the SDK's own atexit shutdown has no time bound
    tracing.shutdown()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zip"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "brotli"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://[::1"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "abc"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
    ],
)
async def test_any_otel_setting_the_sdk_refuses_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    from sidecar.extproc.tracing import check_settings

    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"^tracing: ") as raised:
        check_settings()  # the OTLP exporter and batch processor the server would build
    assert "\n" not in str(raised.value)
    assert len(str(raised.value)) < 300


async def test_a_supervisor_refuses_bad_otel_settings_before_starting_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sidecar.extproc.workers import Supervisor

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "abc")
    started = tmp_path / "started"
    # A worker that would leave a mark: none may start.
    command = [sys.executable, "-c", f"open({str(started)!r}, 'w')"]
    supervisor = Supervisor([command, command], SidecarConfig(tracing=True))
    with pytest.raises(ConfigError, match="OTEL_BSP_MAX_QUEUE_SIZE: expected a whole number"):
        await supervisor.run()
    assert not started.exists()


_CLIENT_CONTEXTS = """
import sys
from sidecar.logs import setup_logging
setup_logging("json", "info")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sidecar.extproc.tracing import Tracing
from sidecar.extproc.record import StreamRecord
tracing = Tracing(exporter=InMemorySpanExporter())
good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
carriers = [
    {"traceparent": "x" * 600},
    {"traceparent": good + "-" + "y" * 5000},
    {"traceparent": good, "tracestate": "k=v," * 300},
    {"traceparent": good, "tracestate": "NOT VALID=" + "\\x01" * 300},
    {"traceparent": good, "tracestate": ",".join(f"k{i}=v" for i in range(60))},
]
for carrier in carriers * 5:
    record = StreamRecord(None, "default", tracing=tracing, access=False, metadata=carrier)
    record.observe("request_headers", 0.001)
    record.finish()
"""


async def test_hostile_trace_context_from_a_client_writes_nothing_to_stderr() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _CLIENT_CONTEXTS], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""  # no unformatted last-resort line, no line per request


async def test_an_over_long_tracestate_is_dropped_and_the_parent_kept() -> None:
    tracing = Tracing(exporter=InMemorySpanExporter())
    from opentelemetry.trace import get_current_span

    kept = tracing.parent({"traceparent": TRACEPARENT, "tracestate": "k=v," * 200})
    assert format(get_current_span(kept).get_span_context().trace_id, "032x") == TRACE_ID
    assert len(get_current_span(kept).get_span_context().trace_state) == 0
    assert tracing.parent({"traceparent": TRACEPARENT + "0"}) is None
    tracing.shutdown()


async def test_a_stream_that_fails_unexpectedly_still_ends_its_span_and_access_line(
    tmp_path: Path, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sidecar.extproc import server as server_module

    async def broken(*args: Any) -> None:
        raise KeyError("a bug nobody expected")

    tracing = Tracing(exporter=exporter)
    specs = (ChainSpec("default", (PluginSpec(f"{TP}AddHeaders"),)),)
    server = ExtProcServer(Registry.from_specs(specs), SidecarConfig(tracing=False, access_log=True), socket_path=None)
    server._tracing, server._recording = tracing, True
    monkeypatch.setattr(server_module, "serve", broken)

    async def read() -> None:
        return None

    async def write(message: Any) -> None:
        return None

    with caplog.at_level("INFO", logger="sidecar.access"), pytest.raises(KeyError):
        await server._stream("default", read, write, {})
    (span,) = _finished(tracing, exporter)
    assert span.attributes["sidecar.outcome"] == "internal"
    (line,) = [r for r in caplog.records if r.name == "sidecar.access"]
    assert getattr(line, "outcome", None) == "internal"


async def test_plugin_spans_past_the_bound_of_a_phase_are_counted(exporter: InMemorySpanExporter) -> None:
    from sidecar.extproc.record import MAX_RECORDED_CALLS, StreamRecord

    tracing = Tracing(exporter=exporter)
    record = StreamRecord(None, "default", tracing=tracing, access=False, metadata={})
    for i in range(MAX_RECORDED_CALLS + 30):  # one phase whose stream hook runs many times
        record.plugin_ran(f"p{i}", "request_body", 0.0001)
    record.observe("request_body", 0.01)
    record.finish()
    spans = _finished(tracing, exporter)
    (stream,) = [s for s in spans if s.name == "ext_proc default"]
    assert stream.attributes["sidecar.plugin_spans_dropped"] == 30
    assert "sidecar.phase_spans_dropped" not in stream.attributes
    assert len([s for s in spans if s.attributes.get("sidecar.plugin")]) == MAX_RECORDED_CALLS
