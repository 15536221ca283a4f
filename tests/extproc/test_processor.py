"""The stream state machine through the in-process Driver (Envoy's side simulated)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from sidecar import Context, Headers, Plugin
from sidecar.chains import Chain, Registry
from sidecar.errors import ProtocolError
from sidecar.extproc.processor import StreamProcessor
from sidecar.testing import Driver, Request, Response
from tests.support import testplugins as tp


def test_headers_both_directions() -> None:
    result = Driver([tp.AddHeaders()]).run(Request(headers={"x-in": "1"}), Response(headers={"a": "b"}))
    assert result.upstream is not None
    assert result.upstream.headers["x-added"] == "yes"
    assert result.upstream.headers["x-in"] == "1"
    assert result.response.headers["x-resp"] == "yes"
    assert result.phases == ["request_headers", "response_headers"]


def test_immediate_response_from_headers() -> None:
    result = Driver([tp.DenyHeader(), tp.AddHeaders()]).run(Request(headers={"x-deny": "1"}))
    assert result.immediate
    assert result.status == 403
    assert result.response.body == b"denied by plugin\n"
    assert result.response.headers["x-denied"] == "1"
    assert result.upstream is None


def test_buffered_body_replacement_updates_content_length() -> None:
    body = b"hello"
    result = Driver([tp.UpperBody()]).run(
        Request("POST", headers={"content-length": str(len(body))}, body=body),
        Response(headers={"content-length": "2"}, body=b"ok"),
    )
    assert result.upstream is not None
    assert result.upstream.body == b"HELLOHELLO"
    assert result.upstream.headers["content-length"] == "10"
    assert result.response.body == b"wrapped:ok"
    assert result.response.headers["content-length"] == str(len(b"wrapped:ok"))


def test_immediate_response_from_body_hook() -> None:
    result = Driver([tp.UpperBody()]).run(Request("POST", body=b"please reject"))
    assert result.immediate and result.status == 422


def test_fail_closed_hides_the_error_and_logs_an_id(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        result = Driver([tp.Raiser(), tp.AddHeaders()]).run(Request(headers={"x-boom": "1"}))
    assert result.immediate and result.status == 500
    assert b"secret-token" not in result.response.body
    error_id = result.response.headers["x-sidecar-error-id"]
    assert any(error_id in record.getMessage() for record in caplog.records)


def test_fail_open_skips_only_the_failing_plugin(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.CRITICAL, logger="sidecar.extproc"):
        result = Driver([tp.AddHeaders(), tp.Raiser(), tp.RequestOnly()], on_error="fail_open").run(
            Request(headers={"x-boom": "1"})
        )
    assert not result.immediate
    assert result.upstream is not None
    assert result.upstream.headers["x-added"] == "yes"  # the plugin before it ran
    assert result.upstream.headers["x-chain"] == "default"  # and the one after it
    assert "x-raiser-saw-response" not in result.response.headers  # bypassed for the rest of the request
    assert result.response.headers["x-resp"] == "yes"  # the others' later phases still run


def test_fail_open_undoes_what_the_failing_hook_changed(caplog: pytest.LogCaptureFixture) -> None:
    class HalfDone(tp.AddHeaders):
        name = "half-done"

        def on_request_headers(self, ctx: object, headers: Headers) -> None:
            headers["x-half"] = "1"
            del headers["x-keep"]
            raise RuntimeError("after changing the headers")

    with caplog.at_level(logging.CRITICAL, logger="sidecar.extproc"):
        result = Driver([HalfDone(), tp.RequestOnly()], on_error="fail_open").run(Request(headers={"x-keep": "k"}))
    assert result.upstream is not None
    assert "x-half" not in result.upstream.headers
    assert result.upstream.headers["x-keep"] == "k"
    assert result.upstream.headers["x-chain"] == "default"


def test_mode_override_when_chain_needs_less() -> None:
    registry = Registry([Chain("default", [tp.UpperBody()]), Chain("light", [tp.RequestOnly()])])
    result = Driver(registry, chain="light").run(Request("POST", body=b"abc"), Response(body=b"resp"))
    assert result.phases == ["request_headers"]
    assert result.upstream is not None and result.upstream.body == b"abc"
    heavy = Driver(registry).run(Request("POST", body=b"abc"), Response(body=b"resp"))
    assert heavy.phases == ["request_headers", "request_body", "response_headers", "response_body"]


def test_protected_headers_are_reported_as_rejected() -> None:
    class SetsEnvoyHeader(tp.AddHeaders):
        def on_request_headers(self, ctx: object, headers: Headers) -> None:
            headers["x-envoy-debug"] = "1"
            headers[":path"] = "/rewritten"

    result = Driver([SetsEnvoyHeader()]).run(Request(path="/orig"))
    assert result.rejected_mutations == ["set x-envoy-debug"]
    assert result.upstream is not None and result.upstream.headers[":path"] == "/rewritten"


def test_dynamic_metadata_and_non_utf8_headers() -> None:
    result = Driver([tp.Metadata()]).run(Request(path="/p", headers=[("x-binary", "\xff\xfe")]))
    assert result.dynamic_metadata == {"envoy-sidecar": {"path": "/p", "binary": "\xff\xfe"}}


def test_metadata_must_be_json_like() -> None:
    class BadMetadata(tp.AddHeaders):
        def on_request_headers(self, ctx: Context, headers: Headers) -> None:
            ctx.set_metadata("raw", b"bytes")

    result = Driver([BadMetadata()]).run(Request())
    assert result.immediate and result.status == 500  # the failure policy answers; the stream survives


def _headers_request() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":path")]))
    )


@pytest.mark.parametrize(
    "sequence",
    [
        ["request_body"],
        ["request_headers", "request_headers"],
        ["request_headers", "request_trailers", "request_body"],
        ["request_headers", "response_trailers", "response_headers"],
        ["response_headers", "request_headers"],
        ["response_body", "request_body"],
        [None],
    ],
)
def test_out_of_order_messages_are_protocol_errors(sequence: list[str | None]) -> None:
    processor = StreamProcessor(Chain("c", [tp.AddHeaders()]))

    async def run() -> None:
        for kind in sequence:
            request = pb.ProcessingRequest() if kind is None else pb.ProcessingRequest(**{kind: {}})
            await processor.process(request)

    with pytest.raises(ProtocolError):
        asyncio.run(run())


def test_a_local_reply_from_a_filter_before_ext_proc_runs_the_response_hooks() -> None:
    # RBAC, JWT or CORS before ext_proc answered the request: Envoy sends only the response side.
    processor = StreamProcessor(Chain("c", [tp.AddHeaders()]))
    reply = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status")]))
    )
    answer = asyncio.run(processor.process(reply))
    assert answer is not None and answer.HasField("response_headers")
    assert processor.ctx.request_headers is None and processor.ctx.request_id


def test_observability_mode_gets_no_answer() -> None:
    processor = StreamProcessor(Chain("c", [tp.AddHeaders()]))
    request = _headers_request()
    request.observability_mode = True
    assert asyncio.run(processor.process(request)) is None


def test_a_header_envoy_would_refuse_is_the_plugins_error_not_envoys(caplog: pytest.LogCaptureFixture) -> None:
    class Smuggler(tp.AddHeaders):
        name = "smuggler"

        def on_request_headers(self, ctx: object, headers: Headers) -> None:
            headers["x-user"] = "alice\r\nx-admin: 1"

    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        closed = Driver([Smuggler()]).run(Request())
    assert closed.immediate and closed.status == 500
    assert closed.response.headers["x-sidecar-error-id"]
    assert "smuggler" in caplog.text and "CR, LF or NUL" in caplog.text
    opened = Driver([Smuggler(), tp.RequestOnly()], on_error="fail_open").run(Request())
    assert opened.upstream is not None and "x-user" not in opened.upstream.headers
    assert opened.upstream.headers["x-chain"] == "default"


def test_a_mode_override_without_header_changes_still_answers_the_phase() -> None:
    # Found by the differential suite: a chain that needs less than the filter sends mode_override on its
    # first answer; with no header change and no route-cache clearing, the answer's oneof was left unset
    # (reading a sub-message sets nothing), an answer to no phase.
    class Looks(Plugin):
        def on_request_headers(self, ctx: Context, headers: Headers) -> None:
            return None

    registry = Registry([Chain("headers", [Looks()]), Chain("body", [tp.UpperBody()])])
    processor = StreamProcessor(registry.chains["headers"], registry)
    assert processor.mode_override is not None
    request = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(), end_of_stream=True))
    response = asyncio.run(processor.process(request))
    assert response is not None
    assert response.WhichOneof("response") == "request_headers"
    assert response.HasField("mode_override")
    assert not response.request_headers.response.HasField("header_mutation")


class _BrokenMetrics:
    """Per-plugin recording that fails: observability must not decide what happens to the request."""

    def plugin_ran(self, plugin: str, phase: str, seconds: float, outcome: object = None) -> None:
        raise RuntimeError("recording failed")


@pytest.mark.parametrize("on_error", ["fail_open", "fail_closed"])
def test_a_failing_recorder_neither_drops_a_deny_nor_blames_the_plugin(
    on_error: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A fail_open chain bypasses a plugin that raised; were a recording error blamed on the plugin, its
    403 would be dropped and the request let through."""
    processor = StreamProcessor(Chain("c", [tp.DenyHeader(), tp.AddHeaders()], on_error), metrics=_BrokenMetrics())
    headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key="x-deny", raw_value=b"1")])
    answer = asyncio.run(processor.process(pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=headers))))
    assert answer is not None and answer.immediate_response.status.code == 403
    assert "recording hook request_headers of plugin deny-header failed" in caplog.text
