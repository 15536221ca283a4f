"""Test helpers for plugin authors.

* `Driver`: runs a chain in-process through the server's own stream lifetime
  (`sidecar.extproc.lifetime.serve`, on in-memory read and write) and plays Envoy's part (which
  messages it sends in the chain's processing mode, how it applies the answers, its default header
  mutation rules). Fast: no sockets, no processes.

      driver = Driver([MyPlugin({"limit": 10})])
      result = driver.run(Request("POST", "/x", {"content-type": "application/json"}, b"{}"))
      assert result.upstream.headers["x-added"] == "yes"

* `EnvoyHarness` and the pytest fixture `sidecar_envoy`: the real thing, a real Envoy and
  `sidecar serve` on a temporary socket and free loopback ports, in front of the echo backend (or a
  given upstream). Logs of both are attached to the test report when a test fails. `EnvoyHarness` is
  the local stack `sidecar up` runs (`sidecar.stack.local.LocalEnvoy`), under its testing name.

      def test_real(sidecar_envoy):
          env = sidecar_envoy(plugins=["header-stamp"])
          assert httpx.get(env.url + "/").headers["server-timing"]

This module is registered as a pytest plugin (entry point `pytest11`), so the fixture is available
wherever envoy-sidecar is installed. It imports nothing heavy until used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sidecar.plugins import BodyMode, struct_to_python
from sidecar.stack.local import LocalEnvoy

if TYPE_CHECKING:
    from sidecar.chains import Registry
    from sidecar.headers import Headers
    from sidecar.plugins import Plugin

__all__ = ["Driver", "EnvoyHarness", "Request", "Response", "Result", "sidecar_envoy"]

HeaderInput = Mapping[str, str] | Iterable[tuple[str, str]]

# Envoy's default HeaderMutationRules: these changes are silently ignored unless the filter allows them.
_PROTECTED_SET = (":method", ":authority", ":scheme", "host")
_PROTECTED_PREFIX = "x-envoy"


def _pairs(headers: HeaderInput) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(k.lower(), v) for k, v in items]


@dataclass
class Request:
    method: str = "GET"
    path: str = "/"
    headers: HeaderInput = ()
    #: The body, or its chunks as Envoy would send them in a streaming mode.
    body: bytes | Sequence[bytes] = b""
    trailers: HeaderInput = ()
    authority: str = "example.test"
    #: Envoy attributes sent with the request headers (`request_attributes`), by name.
    attributes: Mapping[str, Any] = field(default_factory=dict)
    #: Dynamic metadata Envoy forwards (`forwarding_namespaces`), by namespace.
    metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class Response:
    status: int = 200
    headers: HeaderInput = ()
    body: bytes | Sequence[bytes] = b""
    trailers: HeaderInput = ()
    #: Envoy attributes sent with the response headers (`response_attributes`), by name.
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Message:
    """Headers (a case-insensitive view), body and trailers as one side of the exchange saw them."""

    headers: Any
    body: bytes = b""
    trailers: Any = None
    #: The body as the chunks Envoy passed on (streaming modes).
    chunks: list[bytes] = field(default_factory=list)
    #: False when Envoy stopped passing this message on part-way: the upstream got the request headers (and
    #: the chunks before) of a streamed upload answered early, or the client got the response headers (and
    #: the chunks before) of a streamed response that was then reset.
    complete: bool = True


@dataclass
class Result:
    """What Envoy would have done: what the upstream got (None if answered early) and the client got."""

    upstream: Message | None
    response: Message
    status: int
    immediate: bool
    dynamic_metadata: dict[str, Any] = field(default_factory=dict)
    rejected_mutations: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    #: Why the gRPC stream failed (Envoy then answers 500 or cuts the response), or None.
    failed: str | None = None

    @property
    def cut(self) -> bool:
        """The client got the response headers, then a reset: a reply after the response was under way."""
        return not self.response.complete


class _StreamFailed(Exception):
    pass


@dataclass
class _Ended:
    """The server's side of the stream is over; how, if not cleanly."""

    error: BaseException | None = None


class Driver:
    """Drive a plugin chain in-process, exactly as the server does, with Envoy's side simulated."""

    def __init__(
        self,
        plugins: Sequence[Plugin] | Registry,
        *,
        on_error: str = "fail_closed",
        chain: str | None = None,
        stream_timeout: float | None = None,
    ) -> None:
        from sidecar.chains import Chain, Registry
        from sidecar.config import DEFAULT_STREAM_TIMEOUT
        from sidecar.extproc.metrics import Metrics

        # Plugins are checked here as the server checks them at start-up (a PluginLoadError).
        self.registry = plugins if isinstance(plugins, Registry) else Registry([Chain("default", plugins, on_error)])
        self.chain_name = chain
        #: The server's metrics over every run of this driver: `metrics.plugin_errors` counts each plugin
        #: failure (raised, or a result that breaks the hook contract) by plugin and phase.
        self.metrics = Metrics()
        #: The deadline for streaming body stages; by default the server's (`stream_timeout` in the config).
        self.stream_timeout = DEFAULT_STREAM_TIMEOUT if stream_timeout is None else stream_timeout

    @classmethod
    def from_config(cls, path: str | Path, chain: str | None = None) -> Driver:
        from sidecar.chains import Registry
        from sidecar.config import load_config

        return cls(Registry.from_specs(load_config(path).chains), chain=chain)

    def run(self, request: Request, response: Response | None = None) -> Result:
        """Synchronous `exchange` for plain test functions."""
        return asyncio.run(self.exchange(request, response))

    async def exchange(self, request: Request, response: Response | None = None) -> Result:
        from sidecar.headers import Headers

        chain = self.registry.chain(self.chain_name)
        if chain is None:
            raise KeyError(f"no chain named {self.chain_name!r}")
        session = _Session(self, chain)
        result = session.result
        try:
            await session.run(request, response or Response())
        except _StreamFailed as exc:
            result.failed = str(exc)
            if session.under_way():  # the client has the response's headers: Envoy resets it
                if session.mode.response_body_mode == BodyMode.FULL_DUPLEX_STREAMED:
                    result.response.body, result.response.chunks = session._duplex_body("response_body")
            else:  # Envoy's own reply to a failed gRPC stream: a 500 with no body
                result.status = 500
                result.response = Message(Headers([(":status", "500")]))
                _local_reply_framing(result.response)
                upstream = result.upstream
                if upstream is not None and not upstream.complete and session.streams("request"):
                    upstream.body, upstream.chunks = session._duplex_body("request_body")
        finally:
            await session.close()
        return result


class _Session:
    """One simulated HTTP request through Envoy's ext_proc filter.

    The server's side is the server's own stream lifetime (`sidecar.extproc.lifetime.serve`), in a task,
    on in-memory read and write; this object plays Envoy's side. Envoy sends its next message once the
    server has handled the last one (asks to read again), as the old in-process driver did.
    """

    def __init__(self, driver: Driver, chain: Any) -> None:
        from sidecar.extproc.processor import StreamProcessor
        from sidecar.headers import Headers

        self.result = Result(upstream=None, response=Message(Headers()), status=0, immediate=False)
        self.mode = driver.registry.mode
        self.outputs: dict[str, list[tuple[bytes, bool]]] = {"request_body": [], "response_body": []}
        self.processor = StreamProcessor(
            chain, driver.registry, metrics=driver.metrics, stream_timeout=driver.stream_timeout
        )
        self.timeout = driver.stream_timeout + 1.0
        self._to_server: asyncio.Queue[Any] = asyncio.Queue()
        self._from_server: asyncio.Queue[Any] = asyncio.Queue()
        #: Set while the server waits for Envoy's next message, and once its side is over.
        self._reading = asyncio.Event()
        self._server: asyncio.Task[None] | None = None

    # -- the server's side

    async def _read(self) -> Any:
        self._reading.set()
        return await self._to_server.get()

    async def _write(self, message: Any) -> None:
        self._from_server.put_nowait(message)

    async def _write_encoded(self, message: bytes, *more: bytes) -> None:
        """What the native transport writes as views of the pieces, parsed back: the Driver runs the
        server's own encoders (`extproc.encoding`), as Envoy would read them."""
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

        self._from_server.put_nowait(pb.ProcessingResponse.FromString(b"".join((message, *more))))

    async def _serve(self) -> None:
        from sidecar.extproc.lifetime import serve

        ended = _Ended()
        try:
            await serve(self.processor, self._read, self._write, self._write_encoded)
        except Exception as exc:  # the caller's part: map the stream's failure (see `_take`)
            ended.error = exc
        finally:
            self._from_server.put_nowait(ended)
            self._reading.set()

    async def close(self) -> None:
        """Envoy is done: it half-closes the stream, and the server's side ends (stopping any pipeline)."""
        server = self._server
        if server is None:
            return
        if self._reading.is_set():
            self._to_server.put_nowait(None)
        else:
            server.cancel()  # Envoy gave up while the server was handling a message
        await asyncio.wait((server,))

    # -- Envoy's side

    async def _send(self, kind: str, envoy: Mapping[str, Any] | None = None, **fields: Any) -> Any:
        """Send one message (`envoy`: its attributes and forwarded metadata), wait until the server has
        handled it, return its answer (None if none)."""
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

        self.result.phases.append(kind)
        self._reading.clear()
        self._to_server.put_nowait(pb.ProcessingRequest(**{kind: fields}, **(envoy or {})))
        await self._reading.wait()
        answer = None
        while not self._from_server.empty():
            taken = self._take(self._from_server.get_nowait())
            if taken is not None:
                if answer is not None:
                    raise AssertionError(f"two answers to one {kind}: Envoy would fail the stream")
                answer = taken
        if answer is None:
            return None
        self._metadata(answer)
        which = answer.WhichOneof("response")
        if which == "immediate_response":
            return answer.immediate_response
        if which != kind:
            raise AssertionError(f"spurious response {which} to {kind}: Envoy would fail the stream")
        return answer

    def _metadata(self, message: Any) -> None:
        """Envoy applies the dynamic metadata of every message from the server, streamed chunks included."""
        for namespace, values in message.dynamic_metadata.items():
            self.result.dynamic_metadata.setdefault(namespace, {}).update(struct_to_python(values))

    def _take(self, message: Any) -> Any:
        """One message from the server: a streamed body chunk is kept; the answer to a message is returned."""
        from sidecar.errors import ProtocolError, StreamFailure

        if isinstance(message, _Ended):
            if isinstance(message.error, ProtocolError | StreamFailure):
                raise _StreamFailed(str(message.error))  # Envoy: the gRPC stream failed
            if message.error is not None:
                raise message.error
            raise _StreamFailed("the server ended the stream early")
        if message.HasField("override_message_timeout"):
            return None  # ctx.extend_timeout(): Envoy waits longer for the answer
        which = message.WhichOneof("response")
        if which in self.outputs:
            mutation = getattr(message, which).response.body_mutation
            if mutation.WhichOneof("mutation") == "streamed_response":
                streamed = mutation.streamed_response
                self.outputs[which].append((bytes(streamed.body), streamed.end_of_stream))
                self._metadata(message)
                return None
        return message

    async def _body(
        self, kind: str, body: bytes | Sequence[bytes], trailers: bool, headers: Any, passed: Message
    ) -> Any:
        """Send a body as Envoy 1.40 does in the mode; return (the body Envoy passes on, its chunks), or
        (an ImmediateResponse, the chunks passed before it), or None (FULL_DUPLEX: see `_duplex_body`).
        `passed` gets each chunk as Envoy passes it on (what the peer has when a reply cuts the body)."""
        chunks = [c for c in ([body] if isinstance(body, bytes) else list(body)) if c]
        mode = BodyMode(getattr(self.mode, f"{kind.split('_')[0]}_body_mode"))
        if not chunks or mode is BodyMode.NONE:
            passed.body, passed.chunks = b"".join(chunks), list(chunks)
            return b"".join(chunks), chunks
        # Envoy's HTTP/1 server codec ends a request framed by content-length with its last chunk; its client
        # codec ends an upstream's response on its own, whatever the framing.
        framed = kind == "request_body" and "content-length" in headers
        messages = _body_messages(mode, chunks, framed=framed, trailers=trailers)
        if mode is not BodyMode.BUFFERED:
            # Envoy drops the length of a body it passes on as it comes: the peer gets it chunked (HTTP/1).
            headers._discard("content-length")
        if mode is BodyMode.FULL_DUPLEX_STREAMED:
            for chunk, end in messages:
                if await self._send(kind, body=chunk, end_of_stream=end) is not None:
                    raise AssertionError(f"an answer to a FULL_DUPLEX {kind} chunk: Envoy expects streamed chunks")
            if not trailers:
                await self._wait_end(kind)
            return None
        out: list[bytes] = []
        for chunk, end in messages:
            answer = await self._send(kind, body=chunk, end_of_stream=end)
            if _is_immediate(answer):
                return answer, out
            common = getattr(answer, kind).response
            new = _new_body(common, chunk)
            if new:
                out.append(new)
                passed.body += new
                passed.chunks.append(new)
            _apply(common.header_mutation, headers, self.result, request=kind == "request_body")
        return b"".join(out), out

    async def _wait_end(self, kind: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not any(end for _, end in self.outputs[kind]):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _StreamFailed(f"{kind}: no end of stream: Envoy would wait forever")
            try:
                message = await asyncio.wait_for(self._from_server.get(), remaining)
            except TimeoutError:
                continue
            if self._take(message) is not None:
                raise AssertionError(f"spurious response while the {kind} streams: Envoy would fail the stream")

    def _duplex_body(self, kind: str) -> tuple[bytes, list[bytes]]:
        chunks = [body for body, _ in self.outputs[kind] if body]
        return b"".join(chunks), chunks

    def under_way(self) -> bool:
        """Whether the client has the response headers. In FULL_DUPLEX_STREAMED Envoy holds them until the
        first streamed chunk comes back (it may carry their changes)."""
        if not self.result.response.headers:
            return False
        if self.mode.response_body_mode == BodyMode.FULL_DUPLEX_STREAMED:
            return bool(self.outputs["response_body"])
        return True

    def streams(self, direction: str) -> bool:
        """Whether Envoy passes the headers on before the body (NONE, STREAMED, FULL_DUPLEX_STREAMED): a
        reply during the body or the trailers then comes after the peer got the headers."""
        mode = getattr(self.mode, f"{direction}_body_mode")
        return mode in (BodyMode.NONE, BodyMode.STREAMED, BodyMode.FULL_DUPLEX_STREAMED)

    async def run(self, request: Request, response: Response) -> None:
        from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

        from sidecar.headers import Headers

        self._server = asyncio.create_task(self._serve())
        await self._reading.wait()
        send = ProcessingMode.SEND
        result = self.result
        req_headers = _request_headers(request)
        has_body = _has_body(request.body)
        answer = await self._send(
            "request_headers",
            _envoy_fields(request.attributes, request.metadata),
            headers=req_headers.to_header_map(),
            end_of_stream=not has_body and not request.trailers,
        )
        if _immediate(answer, result):
            return
        _apply(answer.request_headers.response.header_mutation, req_headers, result, request=True)
        if answer.HasField("mode_override"):
            self.mode = answer.mode_override
        upstream = Message(req_headers, complete=False)
        if (has_body or request.trailers) and self.streams("request"):
            result.upstream = upstream  # the headers went on; a reply during the upload comes after them
        body = await self._body("request_body", request.body, bool(request.trailers), req_headers, upstream)
        if body is not None and _immediate(body[0], result):
            return
        req_trailers = Headers(_pairs(request.trailers))
        if request.trailers and self.mode.request_trailer_mode == send:
            answer = await self._send("request_trailers", trailers=req_trailers.to_header_map())
            if _immediate(answer, result):
                return
            _apply(answer.request_trailers.header_mutation, req_trailers, result, request=True)
        if body is None:
            body = self._duplex_body("request_body")
        result.upstream = Message(req_headers, body[0], req_trailers, body[1])

        resp_headers = Headers([(":status", str(response.status)), *_pairs(response.headers)])
        has_body = _has_body(response.body)
        if self.mode.response_header_mode == send:
            answer = await self._send(
                "response_headers",
                _envoy_fields(response.attributes, request.metadata),
                headers=resp_headers.to_header_map(),
                end_of_stream=not has_body,
            )
            if _immediate(answer, result):
                return
            _apply(answer.response_headers.response.header_mutation, resp_headers, result, request=False)
        # The headers reached the client (a streamed body) or wait for the body's answer (buffered).
        result.status = int(resp_headers[":status"])
        under_way = result.response = Message(resp_headers, complete=False)
        resp = await self._body("response_body", response.body, bool(response.trailers), resp_headers, under_way)
        if resp is not None and _is_immediate(resp[0]):
            if not self.streams("response"):
                _immediate(resp[0], result)
            # Else the client has the upstream's status and headers and part of the body: Envoy resets it.
            return
        resp_trailers = Headers(_pairs(response.trailers))
        if response.trailers and self.mode.response_trailer_mode == send:
            answer = await self._send("response_trailers", trailers=resp_trailers.to_header_map())
            if _is_immediate(answer):
                return  # the body went on: the reply cuts the response
            _apply(answer.response_trailers.header_mutation, resp_trailers, result, request=False)
        if resp is None:
            resp = self._duplex_body("response_body")
        result.status = int(resp_headers[":status"])
        result.response = Message(resp_headers, resp[0], resp_trailers, resp[1])


def _request_headers(request: Request) -> Headers:
    """The request headers as Envoy hands them on: pseudo-headers first, and an x-request-id."""
    from sidecar.headers import Headers

    headers = Headers(
        [
            (":method", request.method),
            (":path", request.path),
            (":authority", request.authority),
            (":scheme", "http"),
            *_pairs(request.headers),
        ]
    )
    if "x-request-id" not in headers:
        headers["x-request-id"] = "00000000-0000-4000-8000-000000000000"
    return headers


def _has_body(body: bytes | Sequence[bytes]) -> bool:
    return bool(body if isinstance(body, bytes) else any(body))


def _body_messages(mode: BodyMode, chunks: list[bytes], *, framed: bool, trailers: bool) -> list[tuple[bytes, bool]]:
    """The (body, end_of_stream) messages Envoy 1.40 sends for a body from an HTTP/1 peer.

    BUFFERED and BUFFERED_PARTIAL (under the buffer limit): one message. STREAMED: the chunks; the last one
    ends the body when `framed` (a request with a content-length), else the end comes alone as an empty
    chunk (chunked encoding's last chunk; any upstream response). FULL_DUPLEX_STREAMED: always that empty
    end chunk. Trailers end a body instead.
    """
    if mode in (BodyMode.BUFFERED, BodyMode.BUFFERED_PARTIAL):
        return [(b"".join(chunks), not trailers)]
    messages = [(chunk, False) for chunk in chunks]
    if trailers:
        return messages
    if mode is BodyMode.STREAMED and framed:
        messages[-1] = (chunks[-1], True)
    else:
        messages.append((b"", True))
    return messages


def _envoy_fields(attributes: Mapping[str, Any], metadata: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The attributes and forwarded metadata of a headers message, shaped as Envoy sends them: attributes
    under the ext_proc filter's name, metadata by namespace."""
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import struct_pb2

    def struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
        message = struct_pb2.Struct()
        message.update(dict(values))
        return message

    fields: dict[str, Any] = {}
    if attributes:
        fields["attributes"] = {"envoy.filters.http.ext_proc": struct(attributes)}
    if metadata:
        fields["metadata_context"] = base_pb2.Metadata(filter_metadata={ns: struct(v) for ns, v in metadata.items()})
    return fields


def _is_immediate(answer: Any) -> bool:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    return isinstance(answer, pb.ImmediateResponse)


def _immediate(answer: Any, result: Result) -> bool:
    """If `answer` is a reply from Envoy, make it the client's response (with Envoy's framing)."""
    from sidecar.headers import Headers

    if not _is_immediate(answer):
        return False
    headers = Headers([(":status", str(answer.status.code))])
    _apply(answer.headers, headers, result, request=False)
    result.immediate = True
    result.status = answer.status.code
    result.response = Message(headers, answer.body)
    _local_reply_framing(result.response)
    return True


def _local_reply_framing(reply: Message) -> None:
    """What Envoy does to a local reply: `content-type: text/plain` for a body without one, no content-type
    without a body, and the body's length (what an HTTP/1 client sees; 204 and 304 have neither)."""
    headers = reply.headers
    if not reply.body:
        headers._discard("content-type")
    elif "content-type" not in headers:
        headers._put("content-type", b"text/plain")
    if headers[":status"] not in ("204", "304"):
        headers._put("content-length", str(len(reply.body)).encode())


def _new_body(common: Any, body: bytes) -> bytes:
    if common.HasField("body_mutation"):
        if common.body_mutation.WhichOneof("mutation") == "clear_body":
            return b""
        if common.body_mutation.WhichOneof("mutation") == "body":
            return bytes(common.body_mutation.body)
    return body


def _apply(mutation: Any, headers: Any, result: Result, *, request: bool) -> None:
    """Apply a HeaderMutation the way Envoy does with default mutation rules."""
    from envoy.config.core.v3.base_pb2 import HeaderValueOption as Option

    for option in mutation.set_headers:
        name = option.header.key.lower()
        value = option.header.raw_value or option.header.value.encode()
        if name.startswith(_PROTECTED_PREFIX) or (request and name in _PROTECTED_SET):
            result.rejected_mutations.append(f"set {name}")
            continue
        if name == ":status" and not (value.isdigit() and 200 <= int(value) <= 999):
            # Envoy keeps the status it has and counts the change as rejected (the request goes on).
            result.rejected_mutations.append(f"set {name}")
            continue
        action = option.append_action
        if action == Option.APPEND_IF_EXISTS_OR_ADD:  # 0: Envoy decides by the deprecated `append` flag
            if option.HasField("append") and option.append.value:
                headers._add(name, value)
            else:
                headers._put(name, value)
        elif (
            action == Option.OVERWRITE_IF_EXISTS_OR_ADD
            or (action == Option.ADD_IF_ABSENT and name not in headers)
            or (action == Option.OVERWRITE_IF_EXISTS and name in headers)
        ):
            headers._put(name, value)
    for name in mutation.remove_headers:
        if name.startswith((":", _PROTECTED_PREFIX)) or name == "host":
            result.rejected_mutations.append(f"remove {name}")
            continue
        headers._discard(name.lower())


# -- real Envoy harness ---------------------------------------------------------------------------------


#: The real thing for tests: the very stack `sidecar up` runs, `sidecar.stack.local.LocalEnvoy` (by default
#: on a port the OS picks); also a context manager, for use outside pytest.
EnvoyHarness = LocalEnvoy


_HARNESSES = pytest.StashKey[list[EnvoyHarness]]()
_SESSION_HARNESSES = pytest.StashKey[dict[str, EnvoyHarness]]()
_LOOP_SCOPE = "asyncio_default_fixture_loop_scope"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Register the `envoy` marker, and give pytest-asyncio a loop scope when the project sets none.

    pytest-asyncio warns (an error under `-W error`) when `asyncio_default_fixture_loop_scope` is
    unset; "function" is the default it announces for its next versions. A value the project sets wins:
    this runs first and only fills the gap. `_inicache` is where pytest keeps resolved ini values.
    """
    config.addinivalue_line("markers", "envoy: the test starts a real Envoy (the sidecar_envoy fixtures)")
    if config.pluginmanager.hasplugin("asyncio"):
        try:
            unset = not config.getini(_LOOP_SCOPE)
        except ValueError:  # a pytest-asyncio without that option
            return
        cache = getattr(config, "_inicache", None)
        if unset and isinstance(cache, dict):
            cache[_LOOP_SCOPE] = "function"


@pytest.fixture
def sidecar_envoy(request: pytest.FixtureRequest) -> Iterator[Callable[..., EnvoyHarness]]:
    """A factory: `sidecar_envoy(plugins=[...] | config=PATH, routes=[...], workers=N)` -> started harness."""
    started: list[EnvoyHarness] = []
    request.node.stash[_HARNESSES] = started

    def factory(**kwargs: Any) -> EnvoyHarness:
        harness = EnvoyHarness(**kwargs)
        started.append(harness)
        harness.start()
        return harness

    yield factory
    for harness in started:
        harness.close()


@pytest.fixture(scope="session")
def sidecar_envoy_session(request: pytest.FixtureRequest) -> Iterator[Callable[..., EnvoyHarness]]:
    """`sidecar_envoy`, shared by the whole session: the same arguments give the same running harness.

    Starting Envoy and the sidecar costs about a second; tests that only send requests can share one.
    Every harness stops when the session ends. State the plugins keep carries over between tests.
    """
    started: dict[str, EnvoyHarness] = {}
    request.config.stash[_SESSION_HARNESSES] = started

    def factory(**kwargs: Any) -> EnvoyHarness:
        key = repr(sorted(kwargs.items()))
        if key not in started:
            harness = EnvoyHarness(**kwargs)
            try:
                harness.start()
            except BaseException:
                harness.close()
                raise
            started[key] = harness
        return started[key]

    yield factory
    for harness in started.values():
        harness.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        own: list[EnvoyHarness] = item.stash.get(_HARNESSES, [])
        harnesses = list(own)
        if "sidecar_envoy_session" in getattr(item, "fixturenames", ()):
            harnesses += item.config.stash.get(_SESSION_HARNESSES, {}).values()
        for i, harness in enumerate(harnesses):
            report.sections.append((f"envoy-sidecar harness {i} logs", harness.logs()[-20000:]))
    return report
