"""The bridge the native module calls, result by result: each Result kind, the ext_proc path's contract checks,
failure policies, async hooks through the loop thread, deadlines and the watchdog, hostile plugins, and what
`configure` refuses. Streams are driven directly (the exact tuples C gets) and through the native module's
double (tests/support/inprocess_double.py) where a whole request says more."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from sidecar import Context, Headers, Plugin, Respond
from sidecar.errors import ConfigError, PluginLoadError, ProtocolError
from sidecar.inprocess import bridge
from sidecar.inprocess.loop import Watchdog
from sidecar.inprocess.stream import BridgeStream
from sidecar.plugins import BodyMode
from sidecar.testing import Driver, Request, Response
from tests.support.inprocess_double import InProcessDouble, NativeDouble
from tests.support.wait import wait_for

HERE = "tests.inprocess.test_bridge:"
REQUEST = [(":method", b"POST"), (":path", b"/x"), (":authority", b"a.test"), ("x-request-id", b"rid-1")]


# ---- plugins ------------------------------------------------------------------------------------------------


class Edits(Plugin):
    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-set"] = "1"
        headers.append("x-multi", "b")
        headers.remove("x-gone")

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-rid"] = ctx.request_id


class Quiet(Plugin):
    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        return None


class Denies(Plugin):
    def on_request_headers(self, ctx: Context, headers: Headers) -> Respond:
        return Respond(403, "no\n", {"x-why": "policy", "x-envoy-sneaky": "1"}, details="denied by policy/v2")


class Junk(Plugin):
    """Returns whatever `x-junk` names: each is a broken contract, never a pass."""

    def on_request_headers(self, ctx: Context, headers: Headers) -> Any:
        return {"int": 403, "str": "403", "false": False, "class": Respond, "dict": {}}[headers["x-junk"]]


class Raises(Plugin):
    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-half"] = "done"
        raise RuntimeError("secret-token-abc in the message")


class AddsAfter(Plugin):
    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-after"] = "yes"


class Upper(Plugin):
    def on_request_body(self, ctx: Context, body: bytes) -> bytes:
        return body.upper() + b"!"

    def on_response_body(self, ctx: Context, body: bytes) -> str:
        return body.decode() + " (checked)"


class Chunks(Plugin):
    request_body = BodyMode.STREAMED
    response_body = BodyMode.STREAMED

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        ctx.state[SEEN_LENGTH] = ctx.request_headers.get("content-length") if ctx.request_headers else None
        return chunk.replace(b"a", b"aaa")

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes | None:
        return None


from sidecar import StateKey  # noqa: E402  (next to its only use)

SEEN_LENGTH = StateKey[Any]("seen-length")


class TrailerReply(Plugin):
    def on_request_trailers(self, ctx: Context, trailers: Headers) -> Respond:
        return Respond(401)


class Protected(Plugin):
    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-envoy-original"] = "1"
        headers[":authority"] = "elsewhere.test"
        del headers["host"]

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        headers[":status"] = "abc"


class Color(enum.IntEnum):
    RED = 7


class Metadata(Plugin):
    metadata_namespaces = ("other",)

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        ctx.set_metadata("flag", True)
        ctx.set_metadata("enum", Color.RED)
        ctx.set_metadata("ratio", 0.5, "other")
        ctx.set_metadata("nested", {"b": [1, None], "a": "x"}, "other")


class AsyncStamp(Plugin):
    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.threads: list[str] = []

    async def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        await asyncio.sleep(0)
        self.threads.append(threading.current_thread().name)
        headers["x-async"] = "1"

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-sync-after-async"] = "1"


class AsyncBody(Plugin):
    async def on_request_body(self, ctx: Context, body: bytes) -> bytes:
        await asyncio.sleep(0)
        return body[::-1]


class AsyncHangs(Plugin):
    started = threading.Event()
    cancelled = threading.Event()

    async def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        AsyncHangs.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            AsyncHangs.cancelled.set()
            raise


class AsyncBlocksTheLoop(Plugin):
    """Blocks the loop thread itself (a sync sleep inside `async def`): only the watchdog can answer."""

    release = threading.Event()

    async def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        AsyncBlocksTheLoop.release.wait(5)


class AsksForTime(Plugin):
    async def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        await ctx.extend_timeout(5)
        await asyncio.sleep(0.2)  # four times the hook deadline of the test
        headers["x-took-its-time"] = "1"


class Reroutes(Plugin):
    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        headers[":path"] = "/elsewhere"
        ctx.clear_route_cache()


class SetsDelete(Plugin):
    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-odd"] = "a\x7fb"  # Headers allows DEL; the native module refuses it in a value


class AsyncSelfCancels(Plugin):
    async def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        if "x-exit" in headers:
            raise SystemExit(3)
        raise asyncio.CancelledError()


class AsyncJunk(Plugin):
    async def on_request_headers(self, ctx: Context, headers: Headers) -> Any:
        return 200


class Watches(Plugin):
    observe_only = True

    def on_request_headers(self, ctx: Context, headers: Headers) -> Respond:
        headers["x-watched"] = "1"
        return Respond(403)


class WithAttributes(Plugin):
    request_attributes = ("source.address",)

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        return None


class Duplex(Plugin):
    async def on_request_stream(self, ctx: Context, chunks: Any) -> Any:
        async for chunk in chunks:
            yield chunk


# ---- helpers ------------------------------------------------------------------------------------------------


def config_file(tmp_path: Path, *plugins: str, on_error: str = "fail_closed") -> Path:
    uses = ", ".join(f'"{HERE}{p}"' for p in plugins)
    path = tmp_path / "sidecar.yaml"
    path.write_text(f"chains:\n  default: {{on_error: {on_error}, plugins: [{uses}]}}\n")
    return path


def double(tmp_path: Path, *plugins: str, on_error: str = "fail_closed", deadline_ms: int = 1000) -> InProcessDouble:
    return InProcessDouble(config_file(tmp_path, *plugins, on_error=on_error), hook_deadline_ms=deadline_ms)


def stream(tmp_path: Path, *plugins: str, on_error: str = "fail_closed") -> BridgeStream:
    config = double(tmp_path, *plugins, on_error=on_error).config
    return config.new_stream(1)


def filter_config(path: Path, **fields: Any) -> str:
    return json.dumps({"config": str(path), "chain": "default", **fields})


@pytest.fixture(autouse=True)
def _quiet_failures(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level("CRITICAL", logger="sidecar.inprocess")
    yield


# ---- each Result kind ---------------------------------------------------------------------------------------


def test_a_phase_that_changes_nothing_is_none(tmp_path: Path) -> None:
    s = stream(tmp_path, "Quiet")
    assert s.request_headers(list(REQUEST), True) is None


def test_header_changes_are_set_append_remove_ops(tmp_path: Path) -> None:
    s = stream(tmp_path, "Edits")
    headers = [*REQUEST, ("x-multi", b"a"), ("x-gone", b"1")]
    assert s.request_headers(headers, True) == (
        0,
        ((2, b"x-gone", None), (0, b"x-set", b"1"), (1, b"x-multi", b"b")),
        None,
        None,
    )
    assert s.response_headers([(":status", b"200")], True) == (0, ((0, b"x-rid", b"rid-1"),), None, None)


def test_a_respond_is_a_local_reply_with_checked_headers_and_one_token_details(tmp_path: Path) -> None:
    s = stream(tmp_path, "Denies")
    reply = (1, 403, ((b"x-why", b"policy"),), b"no\n", "denied_by_policy_v2", None)
    assert s.request_headers(list(REQUEST), False) == reply
    assert s.rejected == ("set x-envoy-sneaky",)  # ext_proc's mutation rules drop it from a reply too


def test_the_header_stamp_plugin_in_both_directions(tmp_path: Path) -> None:
    path = tmp_path / "stamp.yaml"
    path.write_text("plugins:\n  - use: header-stamp\n")
    config = bridge.configure(filter_config(path), NativeDouble())
    assert (config.phases, config.request_body_mode, config.response_body_mode) == (1 | 8, 0, 0)
    s = config.new_stream(7)
    assert s.request_headers(list(REQUEST), True) == (0, ((0, b"x-stamped-by", b"envoy-sidecar"),), None, None)
    result = s.response_headers([(":status", b"200")], True)
    assert result is not None and result[1][0] == (0, b"x-request-id", b"rid-1")
    assert result[1][1][:2] == (1, b"server-timing") and result[1][1][2].startswith(b"sidecar;dur=")


def test_metadata_keeps_each_type_and_nested_values_as_values(tmp_path: Path) -> None:
    s = stream(tmp_path, "Metadata")
    result = s.request_headers(list(REQUEST), True)
    assert result is not None
    metadata = {(ns, key): value for ns, key, value in result[3]}
    assert metadata == {
        ("envoy-sidecar", "flag"): True,
        ("envoy-sidecar", "enum"): 7,
        ("other", "ratio"): 0.5,
        ("other", "nested"): {"b": [1, None], "a": "x"},
    }
    assert type(metadata["envoy-sidecar", "enum"]) is int and metadata["envoy-sidecar", "flag"] is True


class NestedKinds(Plugin):
    """What `set_metadata` takes, in the shapes a user has: subclasses, tuples, a dict changed after it was set."""

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        class Name(str):
            pass

        later = {"n": 1}
        ctx.set_metadata("kinds", {"t": (1, Color.RED), "s": Name("x"), "none": None, "f": 2.5, "b": False})
        ctx.set_metadata("later", later)
        later["n"] = 2  # as ext_proc, what goes is the value at the phase's end


def test_nested_metadata_goes_as_exact_plain_types(tmp_path: Path) -> None:
    result = stream(tmp_path, "NestedKinds").request_headers(list(REQUEST), True)
    assert result is not None
    values = {key: value for _, key, value in result[3]}
    assert values == {"kinds": {"t": [1, 7], "s": "x", "none": None, "f": 2.5, "b": False}, "later": {"n": 2}}
    kinds = values["kinds"]
    assert type(kinds["t"]) is list and type(kinds["t"][1]) is int and type(kinds["s"]) is str


class DeepMetadata(Plugin):
    """Metadata nested `x-depth` levels deep (or a list that holds itself, made after set_metadata checked it)."""

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        ctx.set_metadata("shallow", "kept")
        if headers["x-depth"] == "cycle":
            loop: list[Any] = []
            ctx.set_metadata("deep", loop)
            loop.append(loop)
            return
        value: Any = "leaf"
        for _ in range(int(headers["x-depth"])):
            value = [value]
        ctx.set_metadata("deep", value)


@pytest.mark.parametrize(("depth", "status"), [("16", 200), ("17", 500), ("10000", 500), ("cycle", 500)])
def test_metadata_nested_too_deep_fails_closed_not_silently(tmp_path: Path, depth: str, status: int) -> None:
    """The native module takes at most 16 levels: past them the phase gets a clear failure, never a dropped value
    or a RecursionError reaching C."""
    d = double(tmp_path, "DeepMetadata")
    result = d.run(Request(headers={"x-depth": depth}))
    assert result.failed is None and result.status == status
    if status == 200:
        assert result.dynamic_metadata["envoy-sidecar"]["shallow"] == "kept"
    else:  # "shallow" may go with the 500 (set_metadata refused the deep one) or not (the phase's batch failed)
        assert result.response.headers["x-sidecar-error-id"] and "deep" not in str(result.dynamic_metadata)


class OddMetadata(Plugin):
    """A value `set_metadata` takes (JSON-like) but the native module cannot set, picked by `x-odd`."""

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        odd = {
            "nan": float("nan"),
            "inf": [1.0, float("-inf")],
            "huge-int": {"n": 10**400},
            "surrogate": "a\ud800b",
            "long": "x" * (64 * 1024 + 1),
        }
        ctx.set_metadata("fine", 1)
        ctx.set_metadata("odd", odd[headers["x-odd"]])


@pytest.mark.parametrize("odd", ["nan", "inf", "huge-int", "surrogate", "long"])
def test_metadata_the_native_module_cannot_set_gets_the_chains_policy(tmp_path: Path, odd: str) -> None:
    """Never C's own refusal (its 500 without the plugin's error id), never a value dropped in silence."""
    closed = double(tmp_path, "OddMetadata").run(Request(headers={"x-odd": odd}))
    assert closed.failed is None and closed.status == 500 and closed.response.headers["x-sidecar-error-id"]
    opened = double(tmp_path, "OddMetadata", "AddsAfter", on_error="fail_open").run(Request(headers={"x-odd": odd}))
    assert opened.failed is None and opened.status == 200 and opened.dynamic_metadata == {}
    assert opened.upstream is not None and opened.upstream.headers["x-after"] == "yes"


class NotesThenDenies(Plugin):
    metadata_namespaces = ("audit",)

    def on_request_headers(self, ctx: Context, headers: Headers) -> Respond | None:
        ctx.set_metadata("seen", {"path": headers[":path"]}, "audit")
        if headers.get("x-act") == "raise":
            raise RuntimeError("after noting")
        return Respond(401) if headers.get("x-act") == "deny" else None

    def on_request_body(self, ctx: Context, body: bytes) -> Respond:
        ctx.set_metadata("size", len(body), "audit")
        return Respond(413)


@pytest.mark.parametrize("act", ["deny", "raise", "body"])
def test_metadata_set_before_a_reply_or_a_failure_goes_with_it_as_ext_proc(tmp_path: Path, act: str) -> None:
    request = Request("POST", "/p", {"x-act": act}, b"abc") if act == "body" else Request(headers={"x-act": act})
    result = double(tmp_path, "NotesThenDenies").run(request)
    ext_proc = Driver([NotesThenDenies()]).run(request)
    assert result.failed is None and result.status == ext_proc.status == {"deny": 401, "raise": 500}.get(act, 413)
    assert result.dynamic_metadata == ext_proc.dynamic_metadata
    expected = {"seen": {"path": "/p" if act == "body" else "/"}, **({"size": 3} if act == "body" else {})}
    assert result.dynamic_metadata == {"audit": expected}


def test_an_observe_only_chain_changes_nothing_as_in_observability_mode(tmp_path: Path) -> None:
    s = stream(tmp_path, "Watches")
    assert s.request_headers(list(REQUEST), True) is None
    assert bridge.meters().plugin_latency[("Watches", "request_headers")][-1] > 0  # it ran


# ---- bodies -------------------------------------------------------------------------------------------------


def test_a_buffered_body_change_fixes_the_held_content_length(tmp_path: Path) -> None:
    d = double(tmp_path, "Upper")
    assert (d.config.request_body_mode, d.config.response_body_mode) == (1, 1)
    s = d.config.new_stream(1)
    assert s.request_headers([*REQUEST, ("content-length", b"5")], False) is None
    assert s.request_body(b"hello", True) == (0, ((0, b"content-length", b"6"),), b"HELLO!", None)
    result = d.run(
        Request("POST", "/", {"content-length": "5"}, b"hello"),
        Response(200, {"content-length": "2"}, b"ok"),
    )
    assert result.upstream is not None and result.upstream.body == b"HELLO!"
    assert result.upstream.headers["content-length"] == "6"
    assert result.response.body == b"ok (checked)" and result.response.headers["content-length"] == "12"


class Partial(Plugin):
    """BUFFERED_PARTIAL both ways: records each call, tags what it saw, and replies when asked to."""

    request_body = BodyMode.BUFFERED_PARTIAL
    response_body = BodyMode.BUFFERED_PARTIAL
    calls: ClassVar[list[tuple[str, int, bool]]] = []

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes | Respond:
        Partial.calls.append(("request", len(chunk), end))
        if ctx.request_headers is not None and ctx.request_headers.get("x-act") == "deny":
            return Respond(403, "scanned\n")
        return b"<" + chunk + b">"

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        Partial.calls.append(("response", len(chunk), end))
        return chunk.upper()


def _partial(tmp_path: Path, limit: int) -> InProcessDouble:
    Partial.calls = []
    return InProcessDouble(config_file(tmp_path, "Partial"), buffer_limit=limit)


def test_buffered_partial_gives_the_hook_what_fits_the_buffer_once_and_the_rest_passes(tmp_path: Path) -> None:
    d = _partial(tmp_path, limit=8)
    assert (d.config.request_body_mode, d.config.response_body_mode) == (3, 3)
    chunks = [b"aaaa", b"bbbb", b"cccc", b"dddd"]
    result = d.run(Request("POST", "/", {"transfer-encoding": "chunked"}, chunks), Response(200, {}, [b"xy"] * 6))
    # One call per direction: the first 8 bytes, not the end; the rest went on unprocessed.
    assert Partial.calls == [("request", 8, False), ("response", 8, False)]
    assert result.upstream is not None and result.upstream.body == b"<aaaabbbb>ccccdddd"
    assert result.response.body == b"XYXYXYXYxyxy" and "content-length" not in result.upstream.headers


def test_buffered_partial_under_the_limit_is_one_whole_call_as_ext_proc(tmp_path: Path) -> None:
    d = _partial(tmp_path, limit=1024)
    request, response = Request("POST", "/", {"content-length": "5"}, b"hello"), Response(200, {}, b"ok")
    result = d.run(request, response)
    assert Partial.calls == [("request", 5, True), ("response", 2, True)]
    ext_proc = Driver([Partial()]).run(request, response)
    assert result.upstream is not None and ext_proc.upstream is not None
    assert result.upstream.body == ext_proc.upstream.body == b"<hello>"
    assert result.response.body == ext_proc.response.body == b"OK"


@pytest.mark.parametrize("limit", [4, 1024])
def test_a_reply_from_a_partial_body_hook_reaches_no_upstream(tmp_path: Path, limit: int) -> None:
    """The headers are held until the partial body's result, as ext_proc holds them: a scanner that says no
    stops the request before the upstream sees any of it."""
    d = _partial(tmp_path, limit=limit)
    result = d.run(Request("POST", "/", {"x-act": "deny", "transfer-encoding": "chunked"}, [b"evil", b"more"]))
    assert (result.status, result.response.body, result.upstream) == (403, b"scanned\n", None)


def test_a_streamed_body_loses_its_length_but_hooks_still_see_it(tmp_path: Path) -> None:
    d = double(tmp_path, "Chunks")
    s = d.config.new_stream(1)
    result = s.request_headers([*REQUEST, ("content-length", b"4")], False)
    assert result == (0, ((2, b"content-length", None),), None, None)
    assert s.request_body(b"abab", True) == (0, (), b"aaabaaab", None)
    assert s.ctx.state[SEEN_LENGTH] == "4"
    assert s.response_headers([(":status", b"200"), ("content-length", b"3")], True) is None  # no body follows


def test_a_respond_in_trailers_breaks_the_contract(tmp_path: Path) -> None:
    s = stream(tmp_path, "TrailerReply")
    s.request_headers(list(REQUEST), False)
    result = s.request_trailers([("x-t", b"1")])
    assert result is not None and result[:2] == (1, 500) and result[4] == "sidecar_plugin_error"
    opened = stream(tmp_path, "TrailerReply", on_error="fail_open")
    opened.request_headers(list(REQUEST), False)
    assert opened.request_trailers([("x-t", b"1")]) is None


# ---- failure policies and hostile plugins -------------------------------------------------------------------


@pytest.mark.parametrize("junk", ["int", "str", "false", "class", "dict"])
def test_junk_from_a_hook_is_the_plugins_error_under_fail_closed(tmp_path: Path, junk: str) -> None:
    d = double(tmp_path, "Junk")
    result = d.run(Request(headers={"x-junk": junk}))
    assert result.status == 500 and result.upstream is None
    assert result.response.headers["x-sidecar-error-id"] and result.response.body == b"Internal Server Error\n"
    assert bridge.meters().plugin_errors.get("Junk\0request_headers", 0) >= 1


def test_fail_closed_hides_the_exception_from_the_client(tmp_path: Path) -> None:
    s = stream(tmp_path, "Raises")
    result = s.request_headers(list(REQUEST), True)
    assert result is not None and result[:2] == (1, 500)
    assert b"secret" not in repr(result).encode()


def test_fail_open_drops_the_failing_plugins_changes_and_bypasses_it(tmp_path: Path) -> None:
    s = stream(tmp_path, "Raises", "AddsAfter", on_error="fail_open")
    assert s.request_headers(list(REQUEST), True) == (0, ((0, b"x-after", b"yes"),), None, None)
    assert "Raises" in s._disabled


def test_clear_route_cache_is_refused_not_silently_ignored(tmp_path: Path) -> None:
    """In-process there is no way to re-pick the route: the request would reach the old one with the new path."""
    closed = stream(tmp_path, "Reroutes").request_headers(list(REQUEST), True)
    assert closed is not None and closed[:2] == (1, 500)
    opened = stream(tmp_path, "Reroutes", on_error="fail_open").request_headers(list(REQUEST), True)
    assert opened == (0, ((0, b":path", b"/elsewhere"),), None, None)  # fail_open: logged, the change goes on


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
def test_a_value_the_native_module_refuses_fails_the_request_closed_whatever_the_policy(
    tmp_path: Path, on_error: str
) -> None:
    """Documented difference: ext_proc's Envoy takes a DEL in a value; the native module fails closed (500)."""
    result = double(tmp_path, "SetsDelete", on_error=on_error).run(Request())
    assert result.status == 500 and result.upstream is None
    assert result.failed is not None and "x-odd" in result.failed


def test_protected_headers_are_dropped_and_counted_as_ext_proc_would(tmp_path: Path) -> None:
    d = double(tmp_path, "Protected")
    before = bridge.meters().rejected_mutations
    result = d.run(Request(headers={"host": "a.test"}), Response(200))
    assert sorted(result.rejected_mutations) == ["remove host", "set :authority", "set :status", "set x-envoy-original"]
    assert result.status == 200 and result.upstream is not None and result.upstream.headers[":authority"] != "elsewhere"
    assert bridge.meters().rejected_mutations == before + 4


def test_huge_headers_and_bodies_go_through_whole(tmp_path: Path) -> None:
    d = double(tmp_path, "Edits", "Upper")
    many = {f"x-h{i}": "v" * 1000 for i in range(1000)}
    body = b"a" * (bridge.DEFAULT_MAX_BODY_BYTES - 1)  # upper-cased with a "!": the most C takes back
    result = d.run(Request("POST", "/", many, body), Response(200, (), b"b" * 1024 * 1024))
    assert result.upstream is not None and result.upstream.body == b"A" * len(body) + b"!"
    assert result.upstream.headers["x-h999"] == "v" * 1000 and result.upstream.headers["x-set"] == "1"
    assert len(result.response.body) == 1024 * 1024 + len(" (checked)")


class Inflates(Plugin):
    def on_request_body(self, ctx: Context, body: bytes) -> bytes:
        return body * 1000

    def on_response_headers(self, ctx: Context, headers: Headers) -> Respond:
        return Respond(502, b"x" * 2048)


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
def test_a_body_over_the_native_limit_is_the_plugins_error_under_its_policy(tmp_path: Path, on_error: str) -> None:
    """The native module would fail such a result closed whatever the policy: the bridge makes it the plugin's."""
    path = config_file(tmp_path, "Inflates", on_error=on_error)
    text = json.dumps({"config": str(path), "chain": "default", "max_body_bytes": 1024})
    config = bridge.configure(text, NativeDouble())
    s = config.new_stream(1)
    s.request_headers([*REQUEST, ("content-length", b"10")], False)
    body = s.request_body(b"0123456789", True)
    reply = s.response_headers([(":status", b"200")], True)
    if on_error == "fail_closed":
        assert body is not None and body[:2] == (1, 500)
    else:
        assert body is None and reply is None  # the plugin is bypassed from its failure on


# ---- async hooks --------------------------------------------------------------------------------------------


def test_an_async_hook_runs_on_the_loop_thread_and_resumes_with_its_result(tmp_path: Path) -> None:
    d = double(tmp_path, "AsyncStamp")
    s = d.config.new_stream(1)
    event = d.native.open(1)
    assert s.request_headers(list(REQUEST), True) == (2,)
    assert event.wait(5)
    assert s.resume() == (0, ((0, b"x-async", b"1"),), None, None)
    plugin = d.config.chain.plugins[0]
    assert isinstance(plugin, AsyncStamp) and plugin.threads == ["sidecar-inprocess-loop"]
    assert s.response_headers([(":status", b"200")], True) == (0, ((0, b"x-sync-after-async", b"1"),), None, None)


def test_an_async_body_hook_pauses_the_held_body(tmp_path: Path) -> None:
    d = double(tmp_path, "AsyncBody")
    result = d.run(Request("POST", "/", {"content-length": "3"}, b"abc"))
    assert result.upstream is not None and result.upstream.body == b"cba"
    assert "request_body" in result.phases


def test_sync_and_async_body_stages_run_in_chain_order_across_the_pause(tmp_path: Path) -> None:
    request = Request("POST", "/", {}, b"abc")
    result = double(tmp_path, "Upper", "AsyncBody", "AsyncBody", "Upper").run(request)
    ext_proc = Driver([Upper(), AsyncBody(), AsyncBody(), Upper()]).run(request)
    assert result.upstream is not None and ext_proc.upstream is not None
    assert result.upstream.body == ext_proc.upstream.body == b"ABC!!"  # upper!, reversed twice, upper!


def test_an_async_hook_past_its_deadline_gets_the_policy_and_is_cancelled(tmp_path: Path) -> None:
    AsyncHangs.cancelled.clear()
    d = double(tmp_path, "AsyncHangs", deadline_ms=50)
    started = time.monotonic()
    result = d.run(Request())
    # Envoy's ext_proc answers a message past its message_timeout 504; so does a hook past its deadline.
    assert result.status == 504 and result.response.headers["x-sidecar-error-id"]
    assert time.monotonic() - started < 5
    assert AsyncHangs.cancelled.wait(5)
    opened = double(tmp_path, "AsyncHangs", "AddsAfter", on_error="fail_open", deadline_ms=50).run(Request())
    assert opened.status == 200 and opened.upstream is not None and opened.upstream.headers["x-after"] == "yes"


class TimesOut(Plugin):
    """A sync hook stopped as the native watchdog stops one (a bare TimeoutError raised in its Python code), or
    one that raises a TimeoutError of its own (a client library's), which is an ordinary failure."""

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        if headers["x-how"] == "watchdog":
            raise TimeoutError
        raise TimeoutError("upstream db timed out")


class AsyncOwnTimeout(Plugin):
    async def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        await asyncio.wait_for(asyncio.sleep(1), 0.001)  # its own deadline, well within the hook's


@pytest.mark.parametrize(
    ("plugin", "how", "status"),
    [
        ("TimesOut", "watchdog", 504),
        ("TimesOut", "own", 500),
        ("AsyncOwnTimeout", "own", 500),
    ],
)
def test_only_the_hook_deadline_answers_504(tmp_path: Path, plugin: str, how: str, status: int) -> None:
    result = double(tmp_path, plugin, deadline_ms=2000).run(Request(headers={"x-how": how}))
    assert result.failed is None and result.status == status and result.response.headers["x-sidecar-error-id"]
    opened = double(tmp_path, plugin, "AddsAfter", on_error="fail_open").run(Request(headers={"x-how": how}))
    assert opened.status == 200 and opened.upstream is not None and opened.upstream.headers["x-after"] == "yes"


class SwallowsTheDeadline(Plugin):
    """Runs past the hook deadline inside `try: ... except Exception`, as plugins often do: it would swallow the
    native watchdog's one TimeoutError, then return as if it had been on time."""

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        with contextlib.suppress(Exception):
            time.sleep(0.25)
        headers["x-late"] = "yes"

    def on_request_body(self, ctx: Context, body: bytes) -> bytes:
        if body == b"late":
            time.sleep(0.25)
        return body


@pytest.mark.parametrize("body", [b"", b"late"])
def test_a_sync_hook_that_returns_past_its_deadline_failed(tmp_path: Path, body: bytes) -> None:
    request = Request("POST", body=body)
    late = "LateBody" if body else "SwallowsTheDeadline"  # LateBody's headers hook is on time
    closed = double(tmp_path, late, deadline_ms=100).run(request)
    assert closed.status == 504 and closed.upstream is None
    opened = double(tmp_path, late, "AddsAfter", on_error="fail_open", deadline_ms=100).run(request)
    assert opened.status == 200 and opened.upstream is not None
    assert "x-late" not in opened.upstream.headers  # the late hook's changes are undone, as any failure's
    assert opened.upstream.headers["x-after"] == "yes"


class LateBody(SwallowsTheDeadline):
    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        return None


def test_extend_timeout_moves_the_async_hooks_deadline(tmp_path: Path) -> None:
    result = double(tmp_path, "AsksForTime", deadline_ms=50).run(Request())
    assert result.status == 200 and result.upstream is not None
    assert result.upstream.headers["x-took-its-time"] == "1"


@pytest.mark.parametrize("how", [{}, {"x-exit": "1"}])
def test_an_async_hook_raising_cancelled_or_exit_gets_the_policy_at_once(tmp_path: Path, how: dict[str, str]) -> None:
    d = double(tmp_path, "AsyncSelfCancels", deadline_ms=5000)
    started = time.monotonic()
    result = d.run(Request(headers=how))
    assert result.status == 500 and result.response.headers["x-sidecar-error-id"]
    assert time.monotonic() - started < 4  # not the watchdog's (two deadlines of 5 s)


def test_concurrent_streams_from_two_workers_keep_apart(tmp_path: Path) -> None:
    """Envoy calls from each worker thread under one GIL; async hooks of both share the loop thread."""
    d = double(tmp_path, "AsyncStamp", "Edits")
    results: list[Any] = []

    def worker() -> None:
        for i in range(40):
            results.append(d.run(Request(headers={"x-request-id": f"{threading.get_ident()}-{i}"}), Response()))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 80
    for result in results:
        assert result.status == 200 and result.upstream is not None
        assert result.upstream.headers["x-async"] == "1" and result.upstream.headers["x-set"] == "1"
        assert result.response.headers["x-rid"] == result.upstream.headers["x-request-id"]


def test_junk_from_an_async_hook_is_the_plugins_error(tmp_path: Path) -> None:
    result = double(tmp_path, "AsyncJunk").run(Request())
    assert result.status == 500 and result.response.headers["x-sidecar-error-id"]


def test_a_hook_that_blocks_the_loop_gets_the_policy_from_the_watchdog_and_a_new_loop(tmp_path: Path) -> None:
    AsyncBlocksTheLoop.release.clear()
    d = double(tmp_path, "AsyncBlocksTheLoop", deadline_ms=50)
    runner = d.config.plan.runner
    assert runner is not None
    replaced, backstops = runner.replaced, bridge.meters().backstops
    try:
        result = d.run(Request())
        assert result.status == 504 and result.response.headers["x-sidecar-error-id"]
        assert bridge.meters().backstops == backstops + 1
        assert runner.replaced == replaced + 1
        # The next async hook runs on the new loop while the old one is still blocked.
        assert double(tmp_path, "AsyncStamp").run(Request()).upstream is not None
    finally:
        AsyncBlocksTheLoop.release.set()


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
def test_after_the_watchdog_gave_up_no_hook_of_the_stream_runs_again(tmp_path: Path, on_error: str) -> None:
    """The hook the watchdog answered for may still be running: the stream's later phases get the policy
    without running hooks (the response-headers fast path included)."""
    AsyncBlocksTheLoop.release.clear()
    d = double(tmp_path, "AsyncBlocksTheLoop", "Edits", on_error=on_error, deadline_ms=50)
    s = d.config.new_stream(1)
    event = d.native.open(1)
    try:
        assert s.request_headers(list(REQUEST), True) == (2,)
        assert event.wait(5)
        answer = s.resume()
        later = s.response_headers([(":status", b"200")], True)
    finally:
        AsyncBlocksTheLoop.release.set()
    if on_error == "fail_closed":
        assert answer is not None and answer[:2] == (1, 504)
        assert later is not None and later[:2] == (1, 500)  # "x-rid" never set: Edits did not run
    else:
        assert answer is None and later is None


def test_no_schedule_reaches_a_stream_closed_while_pending(tmp_path: Path) -> None:
    AsyncHangs.cancelled.clear()
    AsyncHangs.started.clear()
    d = double(tmp_path, "AsyncHangs", deadline_ms=5000)
    s = d.config.new_stream(1)
    d.native.open(1)
    assert s.request_headers(list(REQUEST), True) == (2,)
    assert AsyncHangs.started.wait(5)
    runner = d.config.plan.runner
    assert runner is not None
    armed = runner.watchdog.armed
    s.close()
    assert runner.watchdog.armed <= armed - 1  # its backstop let go of it
    assert AsyncHangs.cancelled.wait(5)  # the hook was cancelled, not left running
    wait_for(lambda: s._pending is not None and s._pending.task is not None and s._pending.task.done(), 5, "the task")
    assert d.native.scheduled == 0 and d.native.late == 0
    s.close()  # twice is fine


# ---- the native module's side of the contract ---------------------------------------------------------------


def test_phases_out_of_order_are_protocol_errors(tmp_path: Path) -> None:
    s = stream(tmp_path, "Upper")
    with pytest.raises(ProtocolError, match="before request_headers"):
        s.request_body(b"x", True)
    s.request_headers(list(REQUEST), False)
    with pytest.raises(ProtocolError, match="resume"):
        s.resume()
    s.request_trailers([])
    with pytest.raises(ProtocolError, match="out of order"):
        s.request_body(b"x", True)


def test_a_local_reply_from_an_earlier_filter_runs_the_response_hooks_alone(tmp_path: Path) -> None:
    # RBAC, JWT or CORS before this filter answered: Envoy runs only the response side, as under ext_proc.
    s = stream(tmp_path, "Upper")
    s.response_headers([(":status", b"403")], True)
    assert s.ctx.request_headers is None and s.ctx.request_id
    with pytest.raises(ProtocolError, match="out of order"):
        s.request_headers(list(REQUEST), True)


@pytest.mark.parametrize(
    "before",
    [
        ["request_headers"],
        ["response_headers"],
        ["request_headers", "response_headers"],
        ["request_headers", "request_body"],
        ["request_headers", "response_headers", "response_body"],
        ["request_headers", "response_headers", "response_trailers"],
    ],
)
def test_a_headers_phase_out_of_order_is_a_protocol_error(tmp_path: Path, before: list[str]) -> None:
    """The headers phases check their order inline (every request has them): the same rule as every phase's."""
    s = stream(tmp_path, "Upper")
    calls = {
        "request_headers": lambda: s.request_headers(list(REQUEST), False),
        "request_body": lambda: s.request_body(b"x", True),
        "response_headers": lambda: s.response_headers([(":status", b"200")], False),
        "response_body": lambda: s.response_body(b"x", True),
        "response_trailers": lambda: s.response_trailers([]),
    }
    for phase in before:
        calls[phase]()
    with pytest.raises(ProtocolError, match="out of order"):
        s.request_headers(list(REQUEST), True)
    if before[-1] != "request_headers" and before[-1] != "request_body":  # the response side has begun
        with pytest.raises(ProtocolError, match="out of order"):
            s.response_headers([(":status", b"200")], True)


def test_a_phase_during_pending_is_a_protocol_error(tmp_path: Path) -> None:
    d = double(tmp_path, "AsyncStamp")
    s = d.config.new_stream(1)
    event = d.native.open(1)
    assert s.request_headers(list(REQUEST), False) == (2,)
    with pytest.raises(ProtocolError, match="pending"):
        s.response_headers([(":status", b"200")], True)
    assert event.wait(5) and s.resume() is not None


# ---- configure ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{", "not JSON"),
        ("[]", "expected a JSON object"),
        ('{"config": "/x", "chain": "default", "colour": 1}', "unknown field 'colour'"),
        ('{"config": "relative.yaml", "chain": "default"}', "absolute path"),
        ('{"config": "CONFIG", "chain": ""}', "field 'chain': expected a non-empty string"),
        ('{"config": "CONFIG", "chain": "default", "hook_deadline_ms": 0}', "hook_deadline_ms"),
        ('{"config": "CONFIG", "chain": "default", "hook_deadline_ms": true}', "hook_deadline_ms"),
        ('{"config": "CONFIG", "chain": "default", "hook_deadline_ms": 1e999}', "hook_deadline_ms"),
        ('{"config": "CONFIG", "chain": "default", "hook_deadline_ms": 2.5}', "hook_deadline_ms"),
        ('{"config": "CONFIG", "chain": "default", "max_body_bytes": 0}', "max_body_bytes"),
        ('{"config": "CONFIG", "chain": "default", "max_body_bytes": "1MiB"}', "max_body_bytes"),
        ('{"config": "CONFIG", "chain": "nope"}', "chain 'nope' is not in .* \\(its chains: default\\)"),
        ('{"config": "/nonexistent/sidecar.yaml", "chain": "default"}', "nonexistent"),
        ("x" * (bridge.MAX_FILTER_CONFIG + 1), "at most"),
    ],
)
def test_a_bad_filter_config_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = config_file(tmp_path, "Quiet")
    with pytest.raises(ConfigError, match=expected) as caught:
        bridge.configure(text.replace("CONFIG", str(path)), NativeDouble())
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [("WithAttributes", "request_attributes \\(source.address\\)"), ("Duplex", "FULL_DUPLEX_STREAMED")],
)
def test_a_chain_that_would_run_differently_in_process_is_refused(tmp_path: Path, plugin: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        double(tmp_path, plugin)


def test_a_plugin_that_fails_to_load_is_its_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text('plugins: ["tests.inprocess.test_bridge:NoSuchPlugin"]\n')
    with pytest.raises(PluginLoadError, match="NoSuchPlugin"):
        bridge.configure(filter_config(path), NativeDouble())


def test_a_native_module_without_schedule_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="schedule"):
        bridge.configure(filter_config(config_file(tmp_path, "Quiet")), object())


def test_meters_count_each_plugin_and_phase(tmp_path: Path) -> None:
    meters = bridge.meters()
    calls = meters.plugin_latency.get(("Edits", "request_headers"), [0] * 15)[:-1]
    before = sum(calls)
    opened = meters.streams.get("default", 0)
    double(tmp_path, "Edits").run(Request(), Response())
    assert sum(meters.plugin_latency[("Edits", "request_headers")][:-1]) == before + 1
    assert meters.streams["default"] == opened + 1
    snapshot = meters.snapshot()
    assert snapshot["plugin_latency"]["Edits\0response_headers"][-1] > 0
    assert set(snapshot) >= {"streams", "active", "plugin_errors", "plugin_latency", "responses", "instruments"}


def test_the_meters_snapshot_is_what_the_sidecars_prometheus_collector_reads(tmp_path: Path) -> None:
    """The proposal for metrics in-process: the sidecar's own collector serves `bridge.meters().snapshot`."""
    from sidecar.extproc.metrics import MetricsCollector

    double(tmp_path, "Edits").run(Request(), Response())
    families = {family.name: family for family in MetricsCollector(bridge.meters().snapshot).collect()}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families["sidecar_plugin_seconds"].samples}
    count = samples[("sidecar_plugin_seconds_count", (("phase", "request_headers"), ("plugin", "Edits")))]
    assert count >= 1
    assert families["sidecar_extproc_streams"].samples[0].value >= 1


def test_a_finished_stream_is_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    """No reference cycle through a stream (its Context pointing back at it cost 2 µs a request in collections);
    and a settled async phase leaves nothing armed in the watchdog."""
    import gc

    def alive() -> bool:
        return any(type(o) is BridgeStream and o.handle == 4242 for o in gc.get_objects())

    d = double(tmp_path, "Edits", "AsyncStamp")
    runner = d.config.plan.runner
    assert runner is not None
    armed = runner.watchdog.armed  # other tests' streams may still be pending
    gc.disable()
    try:
        s = d.config.new_stream(4242)
        event = d.native.open(4242)
        assert s.request_headers(list(REQUEST), True) == (2,)
        assert event.wait(5) and s.resume() is not None
        s.response_headers([(":status", b"200")], True)
        s.close()
        del s
        wait_for(lambda: not alive(), 5, "the stream freed by reference counting")
    finally:
        gc.enable()
    assert runner.watchdog.armed <= armed


def test_the_watchdog_forgets_disarmed_entries_before_their_time() -> None:
    watchdog = Watchdog()
    later = time.monotonic() + 3600  # an hour's deadline: nothing comes due during the test
    kept = watchdog.arm(later, lambda: None)
    for _ in range(20_000):
        watchdog.disarm(watchdog.arm(later, lambda: None))
    assert watchdog.armed == 1
    assert len(watchdog._heap) <= 2 * watchdog.armed + 64 + 1  # not 20,001 entries waiting for their hour
    assert (later, kept) in watchdog._heap
