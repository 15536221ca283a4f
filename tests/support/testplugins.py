"""Plugins the tests use (importable as `tests.support.testplugins:NAME` from the repository root)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

from sidecar import BodyMode, Context, Headers, Plugin, Respond, StateKey

#: The spec prefix that names a plugin class of this module in a config file or `--plugin`.
TP = "tests.support.testplugins:"


class AddHeaders(Plugin):
    """One header added on the request, one on the response: the benchmark's plugin."""

    name = "add-headers"

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-added"] = "yes"

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-resp"] = "yes"


class RequestOnly(Plugin):
    name = "request-only"

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-chain"] = ctx.chain
        headers.remove("x-remove-me")


class DenyHeader(Plugin):
    name = "deny-header"

    def on_request_headers(self, ctx: Context, headers: Headers) -> Respond | None:
        if "x-deny" in headers:
            return Respond(403, b"denied by plugin\n", {"content-type": "text/plain", "x-denied": "1"})
        return None


class UpperBody(Plugin):
    """BUFFERED bodies: request upper-cased and doubled (size changes), response prefixed."""

    name = "upper-body"

    def on_request_body(self, ctx: Context, body: bytes) -> bytes | Respond:
        if b"reject" in body:
            return Respond(422, b"rejected in body hook\n")
        return body.upper() * 2

    def on_response_body(self, ctx: Context, body: bytes) -> bytes:
        return b"wrapped:" + body


class Raiser(Plugin):
    """Raises in the phase named by its `phase` config (default request_headers)."""

    name = "raiser"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.phase = self.config.get("phase", "request_headers")

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        if self.phase == "request_headers" and "x-boom" in headers:
            raise RuntimeError("secret-token-123 should never reach the client")

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-raiser-saw-response"] = "1"


class Slow(Plugin):
    """Awaits for `x-delay` seconds (as a float) before continuing. With config `arrived: PATH` it appends a line
    there as each request enters the hook, for tests that must know a request reached it."""

    name = "slow"

    async def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        arrived = self.config.get("arrived")
        if arrived:
            with open(str(arrived), "a") as out:
                out.write(".\n")
        await asyncio.sleep(float(headers.get("x-delay", "0")))
        headers["x-slow"] = "done"


class PidStamp(Plugin):
    name = "pid-stamp"

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-worker-pid"] = str(os.getpid())


class Metadata(Plugin):
    name = "metadata"

    def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        ctx.set_metadata("path", headers.get(":path", ""))
        ctx.set_metadata("binary", headers.get("x-binary", ""))


class BadConfig(Plugin):
    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        raise ValueError("limit must be positive")


class NotAPlugin:
    pass


class StreamPass(Plugin):
    """STREAMED both ways, passing every chunk unchanged (the memory and throughput baseline)."""

    name = "stream-pass"

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> None:
        return None

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> None:
        return None


class StreamCopy(Plugin):
    """STREAMED both ways, every chunk replaced by a new one of the same bytes: a transforming plugin at
    the least cost a transformation has (one copy), so every chunk goes back to Envoy."""

    name = "stream-copy"

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        return bytes(memoryview(chunk))

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        return bytes(memoryview(chunk))


class FdCopy(Plugin):
    """FULL_DUPLEX_STREAMED both ways, the same one copy per chunk as `StreamCopy`."""

    name = "fd-copy"

    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield bytes(memoryview(chunk))

    async def on_response_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield bytes(memoryview(chunk))


_TALLY = StateKey[int]("chunk-upper-tally")


class ChunkUpperTally(Plugin):
    """STREAMED request: every chunk upper-cased, and how many bytes so far as metadata `request_body_bytes`
    with each (every answer with a new chunk carries metadata too; Envoy keeps the last value)."""

    name = "chunk-upper-tally"

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        ctx.state[_TALLY] = ctx.state.get(_TALLY, 0) + len(chunk)
        ctx.set_metadata("request_body_bytes", str(ctx.state[_TALLY]))
        return chunk.upper()


class BodyLengths(Plugin):
    """BUFFERED: each body's length as metadata (`request_body_bytes`, `response_body_bytes`); after a
    plugin that replaces bodies, one answer carries a new body, its content-length and metadata."""

    name = "body-lengths"

    def on_request_body(self, ctx: Context, body: bytes) -> None:
        ctx.set_metadata("request_body_bytes", str(len(body)))

    def on_response_body(self, ctx: Context, body: bytes) -> None:
        ctx.set_metadata("response_body_bytes", str(len(body)))


class FdPass(Plugin):
    """FULL_DUPLEX_STREAMED both ways, every chunk re-emitted by an async generator."""

    name = "fd-pass"

    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk

    async def on_response_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk


class FdUpper(Plugin):
    """FULL_DUPLEX_STREAMED request: upper-cased, re-chunked into 1000-byte pieces."""

    name = "fd-upper"

    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        pending = b""
        async for chunk in chunks:
            pending += chunk.upper()
            whole = len(pending) - len(pending) % 1000
            view = memoryview(pending)  # slices of a view: re-chunking a 1 MiB chunk is linear, not quadratic
            for start in range(0, whole, 1000):
                yield bytes(view[start : start + 1000])
            view.release()
            pending = pending[whole:]
        if pending:
            yield pending


class FdStall(Plugin):
    """FULL_DUPLEX_STREAMED response that never ends when the path asks for it."""

    name = "fd-stall"

    async def on_response_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
        assert ctx.request_headers is not None
        if "stall" in ctx.request_headers.get(":path", ""):
            await asyncio.Event().wait()


class ChunkGate(Plugin):
    """STREAMED request: answers 413 once the upload passes `limit` bytes, raises on `boom`."""

    name = "chunk-gate"

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> Respond | None:
        seen = ctx.state.get(_SEEN, 0) + len(chunk)
        ctx.state[_SEEN] = seen
        if b"boom" in chunk:
            raise RuntimeError("chunk gate exploded")
        if seen > int(self.config.get("limit", 1 << 20)):
            return Respond(413, b"upload too large\n")
        return None


_SEEN = StateKey[int]("chunk-gate.seen")


_PARTIAL = StateKey[str]("partial-probe")


class PartialProbe(Plugin):
    """BUFFERED_PARTIAL request: reports what it saw (bytes, whole body?) in a response header."""

    name = "partial-probe"
    request_body = BodyMode.BUFFERED_PARTIAL

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> None:
        ctx.state[_PARTIAL] = f"{len(chunk)} {'whole' if end else 'partial'}"

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-partial"] = ctx.state.get(_PARTIAL, "none")


class SlowObserver(Plugin):
    """Observe-only: appends each request path to a file, after a delay Envoy must not wait for."""

    name = "slow-observer"
    observe_only = True

    async def on_request_headers(self, ctx: Context, headers: Headers) -> None:
        await asyncio.sleep(float(self.config.get("delay", 1.0)))
        with open(str(self.config["file"]), "a") as out:
            out.write(headers.get(":path", "") + "\n")


def _wrong_result(what: str) -> Any:
    """A hook result chosen by a request header: the broken plugins of the contract tests."""
    results: dict[str, Any] = {
        "int": 403,
        "str": "403",
        "dict": {"status": 403},
        "false": False,
        "tuple": (403, b"denied"),
        "class": Respond,
        "list": [Respond(403)],
        "bytes": b"denied",
    }
    if what in results:
        return results[what]
    if what == "bad-header-value":
        return Respond(429, headers={"retry-after": 3.5})  # type: ignore[arg-type]  # raises here: in the hook
    if what == "bad-header-name":
        return Respond(403, headers={"x denied": "1"})
    if what == "crlf":
        return Respond(403, headers={"x-denied": "1\r\nset-cookie: a=b"})
    if what == "int-header":
        return Respond(429, b"slow down\n", {"retry-after": 3})  # valid: ints become text
    return None


class WrongResult(Plugin):
    """Request headers: returns what `x-return` names (see `_wrong_result`); None without the header."""

    name = "wrong-result"

    def on_request_headers(self, ctx: Context, headers: Headers) -> Any:
        return _wrong_result(headers.get("x-return", ""))


class WrongBody(Plugin):
    """BUFFERED request body: returns what the body names (see `_wrong_result`)."""

    name = "wrong-body"

    def on_request_body(self, ctx: Context, body: bytes) -> Any:
        return _wrong_result(body.decode("latin-1"))


class WrongYield(Plugin):
    """FULL_DUPLEX_STREAMED request body that yields an int after the first chunk."""

    name = "wrong-yield"

    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for chunk in chunks:
            yield chunk
            yield 403


class Misspelled(Plugin):
    """Its only hook is misspelled: a plugin that would silently do nothing, were it not caught at load."""

    def on_request_header(self, ctx: Context, headers: Headers) -> None:
        headers["x-never"] = "1"


class MultiValue(Plugin):
    """Headers with several values, appended and replaced, both ways and in a local reply."""

    name = "multi-value"

    def on_request_headers(self, ctx: Context, headers: Headers) -> Respond | None:
        if "x-deny" in headers:
            return Respond(401, headers=[("www-authenticate", "Basic"), ("www-authenticate", "Bearer")])
        return None

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        headers.append("set-cookie", "a=1")
        headers.append("set-cookie", "b=2")
        headers["x-multi"] = "p1"
        headers.append("x-multi", "p2")


class Framing(Plugin):
    """What Envoy would cut, strip or drop, chosen by the request's `x-edit` header (issue 14): each is this
    plugin's error at the hook, except what Envoy keeps (removing content-length, a declared namespace)."""

    name = "framing"
    metadata_namespaces = ("other-ns",)

    def on_request_headers(self, ctx: Context, headers: Headers) -> Respond | None:
        edit = headers.get("x-edit", "")
        if edit == "cl-wrong":
            headers["content-length"] = "3"
        elif edit == "cl-remove":
            headers.remove("content-length")
        elif edit == "te":
            headers["transfer-encoding"] = "gzip"
        elif edit == "te-remove":
            headers.remove("transfer-encoding")
        elif edit == "lead":
            headers["x-lead"] = "  v"
        elif edit == "respond-204":
            return Respond(204, b"not for a 204")
        elif edit == "respond-cl":
            return Respond(403, b"denied", {"content-length": "60"})
        elif edit == "ns-other":
            ctx.set_metadata("seen", "yes", namespace="other-ns")
            ctx.set_metadata("count", 3, namespace="other-ns")
        elif edit == "ns-undeclared":
            ctx.set_metadata("seen", "yes", namespace="undeclared-ns")
        return None

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        assert ctx.request_headers is not None
        edit = ctx.request_headers.get("x-edit", "")
        if edit == "resp-connection":
            headers["connection"] = "close"
        elif edit == "resp-cl":
            headers["content-length"] = "1"
        elif edit == "resp-trail":
            headers["x-trail"] = "v\t"


class FdYieldThenRaise(Plugin):
    """FULL_DUPLEX_STREAMED response: passes the first chunk on, then raises."""

    name = "fd-yield-then-raise"

    async def on_response_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
            raise RuntimeError("failed after the first chunk")


_BODY_SEEN = StateKey[str]("body-probe")


class BufferedProbe(Plugin):
    """BUFFERED request: reports the size it saw in a response header (no limit of its own)."""

    name = "buffered-probe"

    def on_request_body(self, ctx: Context, body: bytes) -> None:
        ctx.state[_BODY_SEEN] = str(len(body))

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-body-seen"] = ctx.state.get(_BODY_SEEN, "none")


class StreamProbe(Plugin):
    """STREAMED request: counts chunks and bytes, reported in a response header."""

    name = "stream-probe"

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> None:
        chunks, size = map(int, ctx.state.get(_BODY_SEEN, "0 0").split())
        ctx.state[_BODY_SEEN] = f"{chunks + 1} {size + len(chunk)}"

    def on_response_headers(self, ctx: Context, headers: Headers) -> None:
        headers["x-body-seen"] = ctx.state.get(_BODY_SEEN, "none")


class GrpcGate(Plugin):
    """Answers gRPC calls by method name: `Deny` 403, `Limit` 429 with gRPC status 8, `Boom` raises."""

    name = "grpc-gate"

    def on_request_headers(self, ctx: Context, headers: Headers) -> Respond | None:
        method = headers.get(":path", "").rsplit("/", 1)[-1]
        if method == "Deny":
            return Respond(403, "denied")
        if method == "Limit":
            return Respond(429, "", grpc_status=8)
        if method == "Boom":
            raise RuntimeError("grpc-gate failed")
        return None


class FdRegexStall(Plugin):
    """FULL_DUPLEX_STREAMED request whose hook, on a body starting with `stall`, blocks in C while it holds the
    GIL (a catastrophic regular expression): no hook deadline can interrupt it, and Envoy applies none."""

    name = "fd-regex-stall"

    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if chunk.startswith(b"stall"):
                re.fullmatch(rb"(a+)+b", b"a" * 64)  # exponential backtracking inside the regex engine
            yield chunk
