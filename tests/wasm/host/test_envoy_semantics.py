"""The Envoy behaviours the differential suite found, each pinned without Envoy (fast, and with inputs the
probe module does not make): ABI-specific imports, foreign functions, ticks, real upstreams that fail,
body framing and a stale content-length."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from sidecar.wasm.host import HttpCallResponse, Plugin, Status, WasmLoadError, WasmStateError
from sidecar.wasm.host.errors import WasmUpstreamError
from sidecar.wasm.host.exchange import Request, Response, UpstreamRequest, run_exchange
from sidecar.wasm.host.foreign import call_foreign, is_message
from sidecar.wasm.host.state import HttpCall
from sidecar.wasm.host.upstream import HttpUpstream, cluster_responder
from tests.support import wat
from tests.support.wasm_host import closed_port, echo_server, silent_server


@pytest.mark.parametrize(
    ("marker", "function", "loads"),
    [
        ("0_2_0", "proxy_get_log_level", False),
        ("0_2_1", "proxy_get_log_level", True),
        ("0_2_100", "proxy_get_log_level", True),
        ("0_1_0", "proxy_continue_stream", False),
        ("0_1_0", "proxy_close_stream", False),
        ("0_2_0", "proxy_continue_stream", True),
        ("0_2_1", "proxy_get_configuration", False),
        ("0_2_1", "proxy_continue_request", False),
        ("0_1_0", "proxy_get_configuration", True),
        ("0_1_0", "proxy_clear_route_cache", True),
    ],
)
def test_host_functions_exist_only_in_their_abi_versions(
    marker: str, function: str, loads: bool, shared_cache: Path
) -> None:
    arity = {"proxy_get_configuration": 2, "proxy_continue_request": 0, "proxy_clear_route_cache": 0}.get(function, 1)
    params = " ".join(["i32"] * arity)
    source = wat.module("", marker=marker, imports=f'(import "env" "{function}" (func (param {params}) (result i32)))')
    if loads:
        Plugin(source, cache=shared_cache)
    else:
        with pytest.raises(WasmLoadError, match=f"env.{function} does not exist in proxy-wasm ABI {marker}"):
            Plugin(source, cache=shared_cache)


def test_compress_and_uncompress_are_zlib() -> None:
    packed = call_foreign("compress", b"a" * 1000, 1 << 20)
    assert isinstance(packed, bytes) and zlib.decompress(packed) == b"a" * 1000
    assert call_foreign("uncompress", packed, 1 << 20) == b"a" * 1000


@pytest.mark.parametrize(
    "data",
    [b"not zlib at all", zlib.compress(b"x" * 5000)[:-4], b"", b"\x78\x9c"],
    ids=["garbage", "truncated", "empty", "header-only"],
)
def test_uncompress_of_bad_data_is_a_serialization_failure(data: bytes) -> None:
    assert call_foreign("uncompress", data, 1 << 20) == Status.SERIALIZATION_FAILURE


def test_uncompress_stops_at_the_end_of_the_stream() -> None:
    # zlib's uncompress() reads one stream; what follows it is not looked at.
    assert call_foreign("uncompress", zlib.compress(b"ok") + b"trailing", 1 << 20) == b"ok"


def test_uncompress_never_inflates_past_the_guest_memory() -> None:
    bomb = zlib.compress(b"\0" * (64 << 20), 9)  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 100_000
    assert call_foreign("uncompress", bomb, 1 << 20) == Status.SERIALIZATION_FAILURE


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("declare_property", b"\x0a\x03abc\x10\x01", b""),
        ("declare_property", b"a" * 64, Status.BAD_ARGUMENT),
        ("set_envoy_filter_state", b"\x0a\x01k\x12\x01v", b""),
        ("set_envoy_filter_state", b"\xff\xff\xff", Status.BAD_ARGUMENT),
        ("verify_signature", b"\x0a\x00", Status.UNIMPLEMENTED),
        ("sign", b"\x0b", Status.BAD_ARGUMENT),  # group wire type: not one of Envoy's messages
        ("expr_create", b"request.path", Status.UNIMPLEMENTED),
        ("clear_route_cache", b"anything", b""),
        ("no_such_function", b"", Status.NOT_FOUND),
    ],
)
def test_foreign_functions(name: str, args: bytes, expected: bytes | Status) -> None:
    assert call_foreign(name, args, 1 << 20) == expected


def test_protobuf_check_refuses_lengths_past_the_end_and_endless_varints() -> None:
    assert is_message(b"") and is_message(b"\x08\x96\x01")
    assert not is_message(b"\x0a\x7f" + b"x" * 10)  # a 127-byte field with 10 bytes left
    assert not is_message(b"\x08" + b"\xff" * 20)  # a varint that never ends
    assert not is_message(b"\x00")  # field number 0


def test_advance_ticks_once_per_elapsed_period(shared_cache: Path) -> None:
    plugin = Plugin(wat.ROOT_FEATURES, name="root", cache=shared_cache, environment={"A": "1"}).start()
    if plugin.tick_period_ms == 0:
        pytest.skip("ROOT_FEATURES sets no tick period")
    period = plugin.tick_period_ms
    assert plugin.advance(period - 1) == 0
    assert plugin.advance(1) == 1
    assert plugin.advance(period * 3 + period // 2) == 3
    with pytest.raises(WasmStateError, match="would run 20000 ticks"):
        plugin.advance(period * 20_000)
    with pytest.raises(WasmStateError, match="does not go backwards"):
        plugin.advance(-1)


def test_real_upstream_failures_are_envoys_replies() -> None:
    request = UpstreamRequest([(":method", "GET"), (":path", "/"), (":authority", "x")], b"", [])
    with closed_port() as port:
        refused = HttpUpstream(f"127.0.0.1:{port}")(request)
    assert (refused.status, refused.body) == (503, HttpCallResponse.connect_failure().body)
    with silent_server() as port:
        slow = HttpUpstream(f"127.0.0.1:{port}", timeout_s=0.2)(request)
    assert (slow.status, slow.body) == (504, b"upstream request timeout")
    assert ("content-type", "text/plain") in slow.headers


def test_real_upstream_bounds_the_body_and_checks_its_address() -> None:
    with pytest.raises(WasmUpstreamError, match="is not HOST:PORT"):
        HttpUpstream("localhost")
    request = UpstreamRequest([(":method", "POST"), (":path", "/big"), (":authority", "x")], b"y" * 5000, [])
    with echo_server() as echo, pytest.raises(WasmUpstreamError, match="body over 1000 bytes"):
        HttpUpstream(f"127.0.0.1:{echo.port}", max_body_bytes=1000)(request)


def test_cluster_responder_makes_callouts_and_fails_them_as_envoy() -> None:
    def call(cluster: str, timeout_ms: int = 2000) -> HttpCall:
        headers = [(":method", "GET"), (":path", "/callout"), (":authority", "c")]
        return HttpCall(1, 1, cluster, headers, b"", [], timeout_ms)

    with echo_server() as echo, closed_port() as dead, silent_server() as silent:
        respond = cluster_responder(
            {"echo": f"127.0.0.1:{echo.port}", "dead": f"127.0.0.1:{dead}", "silent": f"127.0.0.1:{silent}"}
        )
        ok = respond(call("echo"))
        assert ok is not None and ok.headers[0] == (":status", "200") and ok.body == b"callout-body"
        assert any(k == "x-envoy-upstream-service-time" for k, _ in ok.headers)
        assert echo.seen[-1].headers.count(("x-envoy-internal", "true")) == 1
        assert respond(call("dead")) == HttpCallResponse.connect_failure()
        assert respond(call("silent", timeout_ms=100)) == HttpCallResponse.timeout()
        assert respond(call("unlisted")) is None


@pytest.fixture(scope="module")
def probe(sdk_modules: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Plugin:
    return Plugin(
        sdk_modules["gcore_probe"], root_id="probe", configuration="c", cache=tmp_path_factory.mktemp("c")
    ).start()


def _request_trace(exchange_headers: list[tuple[str, str]]) -> str:
    return next(v for k, v in exchange_headers if k == "x-r-request-body")


def test_http1_framing_ends_with_an_empty_call_and_whole_framing_does_not(probe: Plugin) -> None:
    request = Request("POST", "/", [("x-req-body", "trace")], b"0123456789")
    http1 = run_exchange(probe, request, Response(200), chunk_size=4)
    whole = run_exchange(probe, request, Response(200), framing="whole")
    assert http1.response is not None and whole.response is not None
    sizes = [call.split("/")[:2] for call in _request_trace(http1.response.headers).split(",")]
    assert sizes == [["4", "0"], ["4", "0"], ["2", "0"], ["0", "1"]]
    assert [c.split("/")[:2] for c in _request_trace(whole.response.headers).split(",")] == [["10", "1"]]


def test_a_grown_request_body_is_flagged_and_forwarded_as_envoy_does(probe: Plugin) -> None:
    seen: list[UpstreamRequest] = []

    def upstream(req: UpstreamRequest) -> Response:
        seen.append(req)
        return Response(200)

    result = run_exchange(probe, Request("POST", "/", [("x-req-body", "grow")], b"hello"), upstream)
    assert seen[0].header("content-length") == "5" and seen[0].body.startswith(b"hello+GROWN")
    assert any("content-length still says 5" in w and "next request" in w for w in result.warnings)


def test_a_shrunk_request_body_gets_envoys_route_timeout_from_a_canned_upstream(probe: Plugin) -> None:
    result = run_exchange(probe, Request("POST", "/", [("x-req-body", "shrink")], b"hello"), Response(200))
    assert result.response is not None and result.response.status == 504
    assert result.response.body == b"upstream request timeout"
    assert any("shrank" in w for w in result.warnings)


def test_a_grown_response_is_cut_to_its_content_length(probe: Plugin) -> None:
    canned = Response(200, [("content-length", "4")], b"body")
    result = run_exchange(probe, Request(headers=[("x-resp-body", "grow")]), canned)
    assert result.response is not None and result.response.body == b"body"
    assert any("the client reads 4 bytes" in w for w in result.warnings)


def test_a_late_local_reply_keeps_the_sent_headers_and_resets(probe: Plugin) -> None:
    result = run_exchange(probe, Request(headers=[("x-resp-body", "local")]), Response(200, [], b"data"))
    assert result.closed and result.local_response is not None and result.local_response.status == 418
    assert result.response is not None and (result.response.status, result.response.body) == (200, b"")
