"""The plugin contract fails closed: a hook result of the wrong type, a Respond that cannot be sent, a
plugin that cannot be called as Envoy calls it. Each is the plugin's error and the chain's failure policy
(or a PluginLoadError at start-up), never a request let through silently."""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar import BodyMode, Context, Headers, Plugin, Respond
from sidecar.chains import Chain
from sidecar.cli import main
from sidecar.errors import PluginLoadError
from sidecar.testing import Driver, Request, Response, Result
from sidecar_plugins.digest import BodyDigest
from sidecar_plugins.jsonl import JsonlTag
from sidecar_plugins.redact import JsonRedact
from sidecar_plugins.sse import SseMeter
from sidecar_plugins.stamp import HeaderStamp
from sidecar_plugins.stream_redact import StreamRedact
from tests.support import testplugins as tp

# -- what a hook returns ---------------------------------------------------------------------------------


async def _coroutine() -> Respond:
    return Respond(403)


def _generator() -> Iterator[int]:
    yield 403


#: Results no hook may return: (label, a factory, as the log describes it). Factories, so each test gets
#: a fresh coroutine or generator.
WRONG: list[tuple[str, Callable[[], Any], str]] = [
    ("int", lambda: 403, "int 403"),
    ("str", lambda: "403", "str of 3 characters"),
    ("bytes-for-headers", lambda: b"403", "bytes of 3 bytes"),
    ("false", lambda: False, "bool False"),
    ("true", lambda: True, "bool True"),
    ("zero", lambda: 0, "int 0"),
    ("float", lambda: 403.0, "float 403.0"),
    ("dict", lambda: {"status": 403}, "dict of 1 items"),
    ("tuple", lambda: (403, b"no"), "tuple of 2 items"),
    ("list-of-respond", lambda: [Respond(403)], "list of 1 items"),
    ("respond-class", lambda: Respond, "the class Respond (not an instance of it)"),
    ("http-status", lambda: http.HTTPStatus.FORBIDDEN, "HTTPStatus <HTTPStatus.FORBIDDEN: 403>"),
    ("object", object, "a object"),
    ("exception-instance", lambda: PermissionError("no"), "a PermissionError"),
    ("coroutine", _coroutine, "a coroutine, never run"),
    ("generator", _generator, "a generator, never run"),
]


def _plugin(hook: str, result: Callable[[], Any], *, is_async: bool) -> Plugin:
    """A plugin whose only hook (by name) returns `result()`; plain def or async def."""
    if hook.endswith("_chunk"):

        def sync(self: Plugin, ctx: Context, value: Any, end: bool) -> Any:
            return result()

        async def asynchronous(self: Plugin, ctx: Context, value: Any, end: bool) -> Any:
            return result()

    else:

        def sync(self: Plugin, ctx: Context, value: Any) -> Any:  # type: ignore[misc]
            return result()

        async def asynchronous(self: Plugin, ctx: Context, value: Any) -> Any:  # type: ignore[misc]
            return result()

    cls = type("Broken", (Plugin,), {"name": "broken", hook: asynchronous if is_async else sync})
    return cls()  # type: ignore[no-any-return]


def _assert_failed_closed(result: Result, caplog: pytest.LogCaptureFixture, hook: str, described: str) -> None:
    assert result.immediate and result.status == 500
    assert result.upstream is None
    assert result.response.body == b"Internal Server Error\n"
    error_id = result.response.headers["x-sidecar-error-id"]
    (record,) = [r for r in caplog.records if error_id in r.getMessage()]
    message = record.getMessage()
    assert "plugin broken failed" in message
    assert f"{hook} returned {described}" in message and "; expected None or a Respond instance" in message


@pytest.mark.parametrize("is_async", [False, True], ids=["def", "async-def"])
@pytest.mark.parametrize(("label", "result", "described"), WRONG, ids=[w[0] for w in WRONG])
def test_a_headers_hook_returning_anything_but_none_or_respond_fails_closed(
    caplog: pytest.LogCaptureFixture, label: str, result: Callable[[], Any], described: str, is_async: bool
) -> None:
    driver = Driver([_plugin("on_request_headers", result, is_async=is_async), tp.AddHeaders()])
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        outcome = driver.run(Request())
    _assert_failed_closed(outcome, caplog, "on_request_headers", described)
    assert driver.metrics.plugin_errors == {"broken\0request_headers": 1}


@pytest.mark.parametrize(("label", "result", "described"), WRONG[:6], ids=[w[0] for w in WRONG[:6]])
def test_fail_open_skips_a_wrong_result_and_logs_and_counts_it(
    caplog: pytest.LogCaptureFixture, label: str, result: Callable[[], Any], described: str
) -> None:
    driver = Driver([_plugin("on_request_headers", result, is_async=False)], on_error="fail_open")
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        outcome = driver.run(Request())
    assert not outcome.immediate and outcome.upstream is not None  # the operator chose fail_open
    assert any(f"on_request_headers returned {described}" in r.getMessage() for r in caplog.records)
    assert driver.metrics.plugin_errors == {"broken\0request_headers": 1}


def test_response_headers_hooks_are_checked_too(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        outcome = Driver([_plugin("on_response_headers", lambda: 204, is_async=True)]).run(Request())
    assert outcome.immediate and outcome.status == 500
    assert any("on_response_headers returned int 204" in r.getMessage() for r in caplog.records)


BODY_WRONG = [w for w in WRONG if w[0] not in ("str", "bytes-for-headers")]  # text and bytes are bodies


@pytest.mark.parametrize("hook", ["on_request_body", "on_request_chunk", "on_response_body", "on_response_chunk"])
@pytest.mark.parametrize(("label", "result", "described"), BODY_WRONG, ids=[w[0] for w in BODY_WRONG])
def test_a_body_or_chunk_hook_returning_a_wrong_type_fails_closed(
    caplog: pytest.LogCaptureFixture, hook: str, label: str, result: Callable[[], Any], described: str
) -> None:
    driver = Driver([_plugin(hook, result, is_async=False)])
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        outcome = driver.run(Request("POST", body=b"payload"), Response(body=b"answer"))
    logged = [r.getMessage() for r in caplog.records if f"{hook} returned {described}" in r.getMessage()]
    assert len(logged) == 1
    if hook == "on_response_chunk":
        # STREAMED: the client has the upstream's status and headers when the chunk fails; Envoy cuts the body.
        assert outcome.cut and not outcome.immediate and outcome.status == 200
        assert outcome.response.body == b""  # the one chunk never went on
        return
    assert outcome.immediate and outcome.status == 500
    if hook == "on_request_body":
        assert outcome.upstream is None  # BUFFERED: Envoy holds the headers until the body is answered
    elif hook == "on_request_chunk":
        # STREAMED: the headers went on to the upstream before the body; its upload is cut.
        assert outcome.upstream is not None and not outcome.upstream.complete and outcome.upstream.body == b""
    assert outcome.response.headers["x-sidecar-error-id"] in logged[0]


@pytest.mark.parametrize("hook", ["on_request_trailers", "on_response_trailers"])
@pytest.mark.parametrize("returned", [Respond(403), 403, "", False], ids=["respond", "int", "empty-str", "false"])
def test_a_trailers_hook_returns_none_only(caplog: pytest.LogCaptureFixture, hook: str, returned: Any) -> None:
    plugin = _plugin(hook, lambda: returned, is_async=False)
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        outcome = Driver([plugin]).run(Request("POST", body=b"x", trailers={"x-t": "1"}), Response(trailers={"a": "b"}))
    assert any(f"{hook} returned" in r.getMessage() and "expected None" in r.getMessage() for r in caplog.records)
    if hook == "on_response_trailers":
        # The response is under way when its trailers come: Envoy cannot replace it, it resets it.
        assert outcome.cut and not outcome.immediate and outcome.status == 200
        return
    assert outcome.immediate and outcome.status == 500
    # The request went on before its trailers (no body hook holds it): the upstream had its headers and body.
    assert outcome.upstream is not None and not outcome.upstream.complete and outcome.upstream.body == b"x"


class _YieldsWrong(Plugin):
    name = "broken"

    def __init__(self, item: Any) -> None:
        super().__init__()
        self.item = item

    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for chunk in chunks:
            yield chunk
            yield self.item


@pytest.mark.parametrize(
    ("item", "described"),
    [
        (403, "int 403"),
        (None, "NoneType None"),
        (Respond(403), "a Respond"),
        ({"a": 1}, "dict of 1 items"),
        ([b"a"], "list of 1 items"),
        (True, "bool True"),
    ],
    ids=["int", "none", "respond", "dict", "list", "bool"],
)
def test_a_stream_hook_yielding_a_wrong_type_fails_the_stream(
    caplog: pytest.LogCaptureFixture, item: Any, described: str
) -> None:
    driver = Driver([_YieldsWrong(item)])
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        outcome = driver.run(Request("POST", body=[b"a", b"b"]))
    assert outcome.failed is not None  # Envoy answers 500 (or cuts a response under way)
    assert "plugin 'broken' failed in on_request_stream (error id " in outcome.failed
    error_id = outcome.failed.split("error id ")[1].rstrip(")")
    (record,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert f"on_request_stream yielded {described}; expected bytes or str" in record.getMessage()
    assert driver.metrics.plugin_errors == {"broken\0request_body": 1}


class _DuplexChunk(Plugin):
    """A chunk hook in a FULL_DUPLEX chain (made so by `request_body`): no Respond once output may be out."""

    name = "broken"
    request_body = BodyMode.FULL_DUPLEX_STREAMED

    def __init__(self, returned: Any) -> None:
        super().__init__()
        self.returned = returned

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> Any:
        return self.returned


@pytest.mark.parametrize(
    ("returned", "described"), [(Respond(413), "a Respond"), (7, "int 7"), (Respond, "the class Respond")]
)
def test_a_chunk_hook_in_a_full_duplex_stream_cannot_respond(
    caplog: pytest.LogCaptureFixture, returned: Any, described: str
) -> None:
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        outcome = Driver([_DuplexChunk(returned)]).run(Request("POST", body=[b"a"]))
    assert outcome.failed is not None and "failed in on_request_chunk" in outcome.failed
    assert any(f"on_request_chunk returned {described}" in r.getMessage() for r in caplog.records)


def test_the_stream_hooks_own_failure_is_named_with_its_error_id(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        outcome = Driver([tp.WrongYield()]).run(Request("POST", body=[b"abc"]))
    assert outcome.failed is not None and "plugin 'wrong-yield' failed in on_request_stream" in outcome.failed


# -- Respond ---------------------------------------------------------------------------------------------


def test_respond_with_an_int_header_value_is_sent() -> None:
    outcome = Driver([tp.WrongResult()]).run(Request(headers={"x-return": "int-header"}))
    assert outcome.immediate and outcome.status == 429
    assert outcome.response.headers["retry-after"] == "3"
    assert outcome.response.body == b"slow down\n"


def test_respond_normalises_what_it_accepts() -> None:
    respond = Respond(
        http.HTTPStatus.TOO_MANY_REQUESTS,
        bytearray(b"x"),  # type: ignore[arg-type]  # accepted, and kept as bytes
        [("Retry-After", 3), ("X-Raw", b"\xff"), ("x-text", "caf\xe9")],
    )
    assert type(respond.status) is int and respond.status == 429
    assert respond.body == b"x"
    assert respond.header_pairs == (("retry-after", "3"), ("x-raw", "\xff"), ("x-text", "caf\xe9"))
    repeated = Headers([("set-cookie", "a=1"), ("set-cookie", "b=2")])
    assert Respond(200, headers=repeated).header_pairs == (("set-cookie", "a=1"), ("set-cookie", "b=2"))
    assert Respond(200, headers=(pair for pair in [("a", "1")])).header_pairs == (("a", "1"),)
    assert Respond(200, headers={"a": "1"}) == Respond(200, headers=[("A", "1")])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"status": "403"}, TypeError, "status: expected an int from 200 to 599, got str"),
        ({"status": 403.0}, TypeError, "got float 403.0"),
        ({"status": True}, TypeError, "got bool True"),
        ({"status": None}, TypeError, "got NoneType None"),
        ({"status": 199}, ValueError, "from 200 to 599, got 199"),
        ({"status": 100}, ValueError, "got 100"),
        ({"status": 600}, ValueError, "got 600"),
        ({"status": -403}, ValueError, "got -403"),
        ({"body": 403}, TypeError, "body: expected bytes or str, got int 403"),
        ({"body": None}, TypeError, "body: expected bytes or str"),
        ({"body": {"error": "x"}}, TypeError, "got dict of 1 items"),
        ({"headers": {"retry-after": 3.5}}, TypeError, "header 'retry-after': expected a str, bytes or int value"),
        ({"headers": {"retry-after": None}}, TypeError, "header 'retry-after'"),
        ({"headers": {"x-flag": True}}, TypeError, "got bool True"),
        ({"headers": {"x-list": ["a"]}}, TypeError, "got list of 1 items"),
        ({"headers": {"x": "1\r\nset-cookie: a=b"}}, ValueError, "header 'x': the value contains CR, LF or NUL"),
        ({"headers": {"x": "a\nb"}}, ValueError, "CR, LF or NUL"),
        ({"headers": {"x": b"a\x00b"}}, ValueError, "CR, LF or NUL"),
        ({"headers": {"x": "\u2603"}}, ValueError, "outside latin-1"),
        ({"headers": {"x y": "1"}}, ValueError, "header name 'x y': expected an RFC 9110 token"),
        ({"headers": {"": "1"}}, ValueError, "header name '': expected"),
        ({"headers": {"x:y": "1"}}, ValueError, "expected an RFC 9110 token"),
        ({"headers": {"caf\xe9": "1"}}, ValueError, "expected an RFC 9110 token"),
        ({"headers": {"x\r\n": "1"}}, ValueError, "expected an RFC 9110 token"),
        ({"headers": {":status": "200"}}, ValueError, "pseudo-headers cannot be set"),
        ({"headers": {":path": "/"}}, ValueError, "pseudo-headers cannot be set"),
        ({"headers": {3: "1"}}, TypeError, "header name: expected str, got int 3"),
        ({"headers": {b"x": "1"}}, TypeError, "header name: expected str, got bytes"),
        ({"headers": "x-a: 1"}, TypeError, "expected a mapping or (name, value) pairs, got str"),
        ({"headers": 5}, TypeError, "expected a mapping or (name, value) pairs, got int 5"),
        ({"headers": [("x", "1", "2")]}, TypeError, "expected (name, value) pairs, got an item tuple of 3 items"),
        ({"headers": ["xy"]}, TypeError, "got an item str of 2 characters"),
        ({"details": 5}, TypeError, "details: expected str"),
        ({"grpc_status": 17}, ValueError, "grpc_status: expected None or a gRPC status code from 0 to 16"),
        ({"grpc_status": -1}, ValueError, "grpc_status"),
        ({"grpc_status": "7"}, ValueError, "grpc_status"),
        # What Envoy would cut, reset or strip: the reply's framing is Envoy's.
        ({"status": 204, "body": b"x"}, ValueError, "Respond status 204 has no body (RFC 9110), got a body of 1 bytes"),
        ({"status": 304, "body": "\u00e9"}, ValueError, "got a body of 2 bytes"),
        ({"headers": {"content-length": "3"}, "body": b"four"}, ValueError, "got '3' for a body of 4 bytes"),
        ({"headers": {"content-length": 0}, "body": "x"}, ValueError, "content-length"),
        ({"headers": [("content-length", "1"), ("content-length", "1")], "body": "xx"}, ValueError, "content-length"),
        ({"headers": {"connection": "close"}}, ValueError, "header 'connection' belongs to the connection"),
        ({"headers": {"Transfer-Encoding": "chunked"}}, ValueError, "belongs to the connection"),
        ({"headers": {"upgrade": "h2c"}}, ValueError, "belongs to the connection"),
        ({"headers": {"keep-alive": "timeout=5"}}, ValueError, "belongs to the connection"),
        ({"headers": {"x": " lead"}}, ValueError, "starts or ends with a space or tab"),
        ({"headers": {"x": b"trail\t"}}, ValueError, "space or tab"),
    ],
)
def test_respond_checks_itself_when_built(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    arguments = {"status": 403, **kwargs}
    with pytest.raises(error) as raised:
        Respond(**arguments)
    assert message in str(raised.value)


def test_respond_accepts_the_framing_envoy_keeps() -> None:
    assert Respond(204).body == b""
    assert Respond(304, headers={"etag": '"v1"'}).header_pairs == (("etag", '"v1"'),)
    assert Respond(200, "\u00e9", {"content-length": "2"}).header_pairs == (("content-length", "2"),)
    assert Respond(200, headers={"content-length": 0}).header_pairs == (("content-length", "0"),)


@pytest.mark.parametrize("what", ["bad-header-value", "bad-header-name", "crlf"])
def test_a_bad_respond_built_in_a_hook_is_that_plugins_error(caplog: pytest.LogCaptureFixture, what: str) -> None:
    driver = Driver([tp.AddHeaders(), tp.WrongResult()])
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        outcome = driver.run(Request(headers={"x-return": what}))
    assert outcome.immediate and outcome.status == 500  # not Envoy's empty 500: ours, with an error id
    error_id = outcome.response.headers["x-sidecar-error-id"]
    (record,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert "plugin wrong-result failed in request_headers" in record.getMessage()
    assert "Respond header" in record.getMessage()
    assert "set-cookie" not in outcome.response.headers
    assert driver.metrics.plugin_errors == {"wrong-result\0request_headers": 1}


def test_a_bad_respond_in_a_body_hook_is_that_plugins_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        outcome = Driver([tp.WrongBody()]).run(Request("POST", body=b"bad-header-value"))
    assert outcome.immediate and outcome.status == 500
    assert any("plugin wrong-body failed in request_body" in r.getMessage() for r in caplog.records)


# -- checked at load -------------------------------------------------------------------------------------


def _load(**attributes: Any) -> None:
    Chain("c", [type("Checked", (Plugin,), attributes)()])


def _headers(self: Plugin, ctx: Context, headers: Headers) -> None:
    return None


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("on_request_header", "did you mean on_request_headers?"),
        ("on_reqest_headers", "did you mean on_request_headers?"),
        ("on_response_header", "did you mean on_response_headers?"),
        ("on_request_trailer", "did you mean on_request_trailers?"),
        ("on_request_bodies", "did you mean on_request_body?"),
        ("on_response_chunks", "did you mean on_response_chunk?"),
        ("on_request_streamed", "did you mean on_request_stream?"),
        ("onRequestHeaders", "did you mean on_request_headers?"),
        ("On_Request_Headers", "did you mean on_request_headers?"),
        ("on_requestheaders", "did you mean on_request_headers?"),
        ("on_headers", "did you mean"),
        ("on_error", "names starting with on_ are hooks"),
    ],
)
def test_a_misspelled_hook_is_a_load_error(name: str, suggestion: str) -> None:
    with pytest.raises(PluginLoadError, match=f"unknown hook {name}: {suggestion}"):
        _load(**{name: _headers, "on_response_headers": _headers})
    with pytest.raises(PluginLoadError, match=f"unknown hook {name}"):  # the only hook: misspelled
        _load(**{name: _headers})


def test_the_load_error_names_the_plugin_and_its_class() -> None:
    with pytest.raises(PluginLoadError) as raised:
        _load(name="auth", on_request_header=_headers)
    assert str(raised.value).startswith("plugin 'auth' (tests.extproc.test_plugin_contract:Checked): unknown hook")
    assert "\n" not in str(raised.value)


def test_a_misspelling_set_on_the_instance_is_caught_too() -> None:
    class Late(tp.AddHeaders):
        def __init__(self) -> None:
            super().__init__()
            self.on_request_header = self.on_request_headers

    with pytest.raises(PluginLoadError, match="did you mean on_request_headers"):
        Chain("c", [Late()])


def _star_args(self: Plugin, *args: Any) -> None:
    return None


def _defaults(self: Plugin, ctx: Context, headers: Headers, extra: int = 0, **options: Any) -> None:
    return None


def _no_ctx(self: Plugin, headers: Headers) -> None:
    return None


def _extra_required(self: Plugin, ctx: Context, headers: Headers, config: Any) -> None:
    return None


def _keyword_only(self: Plugin, ctx: Context, headers: Headers, *, strict: bool) -> None:
    return None


def _nothing(self: Plugin) -> None:
    return None


@pytest.mark.parametrize(
    ("hook", "func", "message"),
    [
        ("on_request_headers", _no_ctx, r"on_request_headers\(headers\) cannot be called as on_request_headers\(ctx, "),
        ("on_request_headers", _extra_required, r"cannot be called as on_request_headers\(ctx, headers\)"),
        ("on_request_headers", _keyword_only, r"on_request_headers\(ctx, headers, \*, strict\) cannot be called"),
        # a partial is not bound to the instance: `self` is left to fill
        ("on_request_headers", functools.partial(_defaults, extra=1), r"\(self, ctx, headers, \*, extra=..., \*\*"),
        ("on_response_trailers", _nothing, r"on_response_trailers\(\) cannot be called as"),
        ("on_request_chunk", _headers, r"cannot be called as on_request_chunk\(ctx, chunk, end_of_stream\)"),
        ("on_request_body", _no_ctx, r"cannot be called as on_request_body\(ctx, body\)"),
    ],
)
def test_a_hook_that_cannot_take_ctx_and_value_is_a_load_error(hook: str, func: Any, message: str) -> None:
    with pytest.raises(PluginLoadError, match=message):
        _load(**{hook: func})


def _unbound_with_flag(ctx: Context, headers: Headers, flag: bool) -> None:
    return None


class _Callable:
    def __call__(self, ctx: Context, headers: Headers) -> None:
        return None


class _AsyncCallable:
    async def __call__(self, ctx: Context, headers: Headers) -> Respond:
        return Respond(401)


@pytest.mark.parametrize(
    "func",
    [
        _star_args,
        _defaults,
        staticmethod(lambda ctx, headers: None),
        _Callable(),
        functools.partial(_unbound_with_flag, flag=True),
    ],
    ids=["star-args", "defaults", "staticmethod", "callable-object", "partial"],
)
def test_hooks_that_accept_ctx_and_value_load(func: Any) -> None:
    _load(on_request_headers=func)


def test_hooks_that_are_async_in_disguise_are_awaited() -> None:
    """An object with `async def __call__`, or a decorated coroutine function, is run as async."""

    def traced(func: Any) -> Any:
        @functools.wraps(func)
        def wrapper(*args: Any) -> Any:
            return func(*args)  # a sync wrapper handing back the coroutine

        return wrapper

    class Decorated(Plugin):
        @traced
        async def on_request_headers(self, ctx: Context, headers: Headers) -> Respond:
            return Respond(401)

    class WithCallable(Plugin):
        on_request_headers = _AsyncCallable()

    for plugin in (Decorated(), WithCallable()):
        outcome = Driver([plugin]).run(Request())
        assert outcome.immediate and outcome.status == 401


async def _async_stream_without_yield(self: Plugin, ctx: Context, chunks: Any) -> None:
    return None


def _sync_generator_stream(self: Plugin, ctx: Context, chunks: Any) -> Iterator[bytes]:
    yield b""


def _plain_stream(self: Plugin, ctx: Context, chunks: Any) -> Any:
    return chunks


async def _async_generator_headers(self: Plugin, ctx: Context, headers: Headers) -> AsyncIterator[None]:
    yield None


def _generator_body(self: Plugin, ctx: Context, body: bytes) -> Iterator[bytes]:
    yield body


@pytest.mark.parametrize(
    ("hook", "func", "message"),
    [
        ("on_request_stream", _async_stream_without_yield, "on_request_stream must be an async generator"),
        ("on_response_stream", _sync_generator_stream, "on_response_stream must be an async generator"),
        ("on_request_stream", _plain_stream, "must be an async generator"),
        ("on_request_headers", _async_generator_headers, "on_request_headers yields, but only on_\\*_stream"),
        ("on_request_body", _generator_body, "on_request_body yields"),
        ("on_request_headers", "yes", "on_request_headers must be a method .or None to drop the hook., got str"),
        ("on_request_headers", 403, "got int 403"),
    ],
)
def test_hook_shapes_are_checked_at_load(hook: str, func: Any, message: str) -> None:
    with pytest.raises(PluginLoadError, match=message):
        _load(**{hook: func})


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"request_body": BodyMode.BUFFERED}, "request_body = BUFFERED but no request body hook uses it"),
        ({"response_body": BodyMode.STREAMED}, "response_body = STREAMED but no response body hook uses it"),
        (
            {"request_body": BodyMode.FULL_DUPLEX_STREAMED, "on_response_body": _headers},
            "request_body = FULL_DUPLEX_STREAMED but no request body hook",
        ),
        ({"request_body": "buffered"}, "request_body must be a BodyMode, got str"),
        ({"request_body": True}, "request_body must be a BodyMode, got bool True"),
        ({"request_body": 9}, "request_body must be a BodyMode, got int 9"),
        ({"request_body": BodyMode.NONE, "on_request_body": _headers}, "request_body = NONE does not fit"),
        ({"name": 5}, "name must be a str, got int 5"),
        ({"observe_only": "yes"}, "observe_only must be True or False"),
    ],
)
def test_declarations_are_checked_at_load(attributes: dict[str, Any], message: str) -> None:
    with pytest.raises(PluginLoadError, match=message):
        _load(on_request_headers=_headers, **attributes)


def test_a_plugin_without_hooks_is_a_load_error() -> None:
    with pytest.raises(PluginLoadError, match="defines no hook"):
        _load()

    class DropsEverything(tp.RequestOnly):
        def __init__(self) -> None:
            super().__init__()
            self.on_request_headers = None  # type: ignore[method-assign,assignment]

    with pytest.raises(PluginLoadError, match="defines no hook"):
        Chain("c", [DropsEverything()])


def test_an_instance_may_drop_the_hook_its_declaration_is_for() -> None:
    Chain("c", [JsonRedact({"direction": "response"})])  # request_body = BUFFERED, on_request_body = None


def test_every_reference_plugin_loads_under_the_checks() -> None:
    for cls in (HeaderStamp, JsonRedact, StreamRedact, BodyDigest, JsonlTag, SseMeter):
        config = {"pattern": "secret"} if cls is StreamRedact else {}
        Chain("c", [cls(config)])


def test_the_cli_reports_a_load_error_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--plugin", "tests.support.testplugins:Misspelled"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "unknown hook on_request_header: did you mean on_request_headers?" in err
    assert "tests.support.testplugins:Misspelled" in err


def test_a_stray_coroutine_is_closed_not_left_unawaited() -> None:
    """A plain def hook returning a coroutine: the error says so, and Python warns of nothing (the suite
    turns warnings into errors, so a "never awaited" coroutine would fail this test)."""
    outcome = Driver([_plugin("on_request_headers", _coroutine, is_async=False)]).run(Request())
    assert outcome.immediate and outcome.status == 500


def test_sync_and_async_hooks_both_work_when_they_keep_the_contract() -> None:
    class Both(Plugin):
        def on_request_headers(self, ctx: Context, headers: Headers) -> None:
            headers["x-sync"] = "1"

        async def on_response_headers(self, ctx: Context, headers: Headers) -> None:
            await asyncio.sleep(0)
            headers["x-async"] = "1"

    outcome = Driver([Both()]).run(Request())
    assert outcome.upstream is not None and outcome.upstream.headers["x-sync"] == "1"
    assert outcome.response.headers["x-async"] == "1"


def test_the_testing_guide_example_of_a_broken_plugin_runs_as_written() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "testing.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL) if "class Deny" in b]
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    namespace["test_a_wrong_result_fails_closed"]()


def test_a_full_duplex_chunk_hooks_own_timeout_error_is_its_failure_not_the_deadline() -> None:
    class RaisesTimeout(_DuplexChunk):
        def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> Any:
            raise TimeoutError("upstream auth service timed out")

    class TooSlow(_DuplexChunk):
        async def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> Any:
            await asyncio.Event().wait()

    raised = Driver([RaisesTimeout(None)]).run(Request("POST", body=[b"a"]))
    assert raised.failed is not None and "plugin 'broken' failed in on_request_chunk (error id" in raised.failed
    slow = Driver([TooSlow(None)], stream_timeout=0.2).run(Request("POST", body=[b"a"]))
    assert slow.failed is not None and "on_request_chunk of plugin 'broken' took longer than 0.2s" in slow.failed


class ReadsWhatEnvoySends(Plugin):
    """Echoes the attributes and forwarded metadata it sees, per phase, into its own metadata namespace."""

    metadata_namespaces = ("seen",)
    forwarding_namespaces = ("envoy.filters.http.jwt_authn",)
    request_attributes = ("request.path",)
    response_attributes = ("response.code",)

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        ctx.set_metadata("request", dict(ctx.attributes), namespace="seen")
        ctx.set_metadata("forwarded", ctx.metadata, namespace="seen")

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        ctx.set_metadata("response", dict(ctx.attributes), namespace="seen")


def test_attributes_are_by_name_and_metadata_forwarded_as_envoy_sends_them() -> None:
    """Envoy nests attributes under the ext_proc filter's name; plugins read them by attribute name, the
    request's stay for the response, and whole numbers are int (Envoy's `response.code` is a double)."""
    result = Driver([ReadsWhatEnvoySends()]).run(
        Request(
            path="/a",
            attributes={"request.path": "/a"},
            metadata={"envoy.filters.http.jwt_authn": {"sub": "alice", "exp": 1700000000}},
        ),
        Response(attributes={"response.code": 200}),
    )
    seen = result.dynamic_metadata["seen"]
    assert seen["request"] == {"request.path": "/a"}
    assert seen["forwarded"] == {"envoy.filters.http.jwt_authn": {"sub": "alice", "exp": 1700000000}}
    assert seen["response"] == {"request.path": "/a", "response.code": 200}
    assert type(seen["response"]["response.code"]) is int
