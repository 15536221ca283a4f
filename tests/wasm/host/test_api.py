"""The Python testing API on real modules: callouts answered by hand, chunked bodies, root features."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.wasm.host import Action, HttpCallResponse, LogLevel, Plugin, WasmCallError, WasmStateError
from sidecar.wasm.host.exchange import Request, Response, run_exchange
from tests.support import wat

CONFIG = "tag-api"


@pytest.fixture(params=["gcore_conformance", "solo_conformance"])
def plugin(request: pytest.FixtureRequest, sdk_modules: dict[str, Path], shared_cache: Path) -> Plugin:
    return Plugin(sdk_modules[request.param], root_id="fixture", configuration=CONFIG, cache=shared_cache).start()


def _request(*extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [(":authority", "example.com"), (":path", "/p"), (":method", "POST"), (":scheme", "http"), *extra]


def test_callout_answered_by_hand(plugin: Plugin) -> None:
    http = plugin.http_context()
    action = http.on_request_headers(_request(("x-callout", "1")))
    assert action is Action.STOP_ALL_ITERATION_AND_WATERMARK  # Envoy's rewrite of StopIteration
    [call] = plugin.http_calls
    assert (call.upstream, call.header(":path"), call.header(":authority")) == ("echo", "/callout", "echo")
    assert not http.take_continue_request()
    plugin.respond_http_call(call, HttpCallResponse.of(202, b"from-test"))
    assert http.take_continue_request()
    headers = dict(http.request_headers)
    assert (headers["x-callout-status"], headers["x-callout-body"]) == ("202", "from-test")
    assert plugin.http_calls == []
    with pytest.raises(WasmStateError, match="no pending http call"):
        plugin.respond_http_call(call, None)


def test_chunked_body_is_buffered_until_end_of_stream(plugin: Plugin) -> None:
    http = plugin.http_context()
    assert http.on_request_headers(_request(("x-rewrite", "1"))) is Action.CONTINUE
    assert http.on_request_body(b"one secret, ", end_of_stream=False) is Action.PAUSE
    assert http.on_request_body(b"two secret", end_of_stream=True) is Action.CONTINUE
    assert http.request_body == b"one ******, two ******"
    http.finish()
    with pytest.raises(WasmStateError, match="already finished"):
        http.on_request_trailers([])


def test_exchange_with_chunks_and_local_reply(plugin: Plugin) -> None:
    body = b"secret " * 5000
    rewritten = run_exchange(
        plugin,
        Request("POST", "/u", [("x-rewrite", "1")], body),
        lambda req: Response(200, [("x-echo", "1")], req.body),
        chunk_size=4096,
    )
    phases = [phase for phase, _ in rewritten.actions]
    # HTTP/1 framing: every chunk with end_of_stream=false, then one empty call with end_of_stream=true.
    assert phases.count("request_body") == len(body) // 4096 + 2
    assert rewritten.response is not None and rewritten.response.body == body.replace(b"secret", b"******")
    assert rewritten.header("x-wasm-tag") == CONFIG and rewritten.header("x-echo") is None

    denied = run_exchange(plugin, Request(headers=[("x-deny", "1")]), Response(200))
    assert denied.local_response is not None and denied.upstream_request is None
    assert (denied.local_response.status, denied.local_response.body) == (403, b"denied by wasm")
    assert plugin.metrics["fixture_requests"] == 2


def test_unanswered_callout_stalls(plugin: Plugin) -> None:
    result = run_exchange(plugin, Request(headers=[("x-callout", "1")]), Response(200))
    assert result.stalled == "request_headers"
    assert result.response is None and result.upstream_request is None
    assert len(plugin.http_calls) == 1


def test_root_features(tmp_path: Path) -> None:
    plugin = Plugin(wat.ROOT_FEATURES, environment={"A": "1", "B": "two"}, cache=tmp_path).start()
    assert plugin.logs(LogLevel.INFO) == ["A=1\0B=two\0"]
    assert plugin.tick_period_ms == 50
    assert plugin.shared_data == {}
    plugin.tick()
    assert plugin.shared_data == {b"last": b"tick"}


def test_log_level_filters(sdk_modules: dict[str, Path], shared_cache: Path) -> None:
    module = sdk_modules["solo_conformance"]
    quiet = Plugin(module, root_id="fixture", configuration="c", log_level=LogLevel.ERROR, cache=shared_cache)
    chatty = Plugin(module, root_id="fixture", configuration="c", log_level=LogLevel.TRACE, cache=shared_cache)
    quiet.start()
    chatty.start()
    assert chatty.logs(LogLevel.DEBUG)
    assert quiet.logs() == []


def test_reconfigure(plugin: Plugin) -> None:
    plugin.configure("tag-2")
    result = run_exchange(plugin, Request(), Response(200))
    assert result.header("x-wasm-tag") == "tag-2"
    with pytest.raises(WasmCallError, match="rejected its plugin configuration"):
        plugin.configure("reject")
