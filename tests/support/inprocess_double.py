"""An in-memory double of the native module: it drives a bridge stream exactly as the C filter does.

`InProcessDouble(config_path, chain).run(Request, Response)` plays one HTTP request through Envoy with the
in-process filter and returns the `sidecar.testing.Result` the ext_proc `Driver` returns for the same
request, so the two backends can be compared field by field. What it does, as the contract says C does:

* calls `configure(filter_config_json, native)` once, with a `native` whose `schedule(handle)` may be called
  from any thread, and `config.new_stream(handle)` at the first hook;
* calls only the phases whose bit is set in `config.phases`;
* body mode 1 (buffered): holds the headers, calls the body hook once with the whole body and
  `end_of_stream=True`, applies that result's header ops to the held headers; mode 3 (buffered partial):
  the same with at most Envoy's buffer limit of the body (`end_of_stream` True only if that is all of it), the
  rest passing on unprocessed; mode 2 (streamed): one call per chunk as Envoy 1.40's HTTP/1 codecs deliver
  them, the headers already gone on;
* PENDING: waits (bounded) for `schedule`, then calls `resume()` on the same thread and applies its result;
* checks every result strictly; an exception or a result not exactly of the contract's shapes is a 500 local
  reply with details `sidecar_inprocess_error` (and `Result.failed` says why), never traffic passing;
* sets the metadata of a CONTINUE or a RESPOND (before the local reply);
* applies a RESPOND as Envoy's local reply (its framing), or cuts a response already under way.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidecar.headers import Headers
from sidecar.inprocess.bridge import configure
from sidecar.plugins import BodyMode
from sidecar.testing import (
    Message,
    Request,
    Response,
    Result,
    _body_messages,
    _has_body,
    _local_reply_framing,
    _pairs,
    _request_headers,
)
from sidecar.wire import PHASES

__all__ = ["BadResult", "InProcessDouble", "NativeDouble", "check_result", "metadata_differences", "replied"]

BITS = {phase: 1 << i for i, phase in enumerate(PHASES)}
#: The C module's reply when Python fails or breaks the contract.
FAULT_DETAILS = "sidecar_inprocess_error"


class BadResult(Exception):
    """What C would log (one line) before its 500: the bridge raised or returned something off-contract."""


class NativeDouble:
    """`sidecar_inprocess_native`: schedule(handle) -> bool, thread-safe, False once the stream is gone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[int, threading.Event] = {}
        self.scheduled = 0
        self.late = 0  # schedule() for a stream that was gone

    def open(self, handle: int) -> threading.Event:
        with self._lock:
            event = self._events[handle] = threading.Event()
        return event

    def gone(self, handle: int) -> None:
        with self._lock:
            self._events.pop(handle, None)

    def schedule(self, handle: int) -> bool:
        with self._lock:
            event = self._events.get(handle)
            if event is None:
                self.late += 1
                return False
            self.scheduled += 1
        event.set()
        return True


# What the native module accepts in a Result (its checks, sidecar/inprocess/native/module.c): anything else is
# failed closed there, so the double refuses it too.
_TOKEN = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~")
_DETAIL_TOKEN = _TOKEN | frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SETTABLE_PSEUDO = frozenset({b":path", b":method", b":authority", b":scheme", b":status"})
MAX_HEADER_OPS = 1024
MAX_HEADER_NAME = 1024
MAX_HEADER_VALUE = 64 * 1024
MAX_METADATA_ENTRIES = 128
MAX_METADATA_NAME = 256
MAX_METADATA_STRING = 64 * 1024
MAX_DETAILS = 128
MAX_BODY = 8 * 1024 * 1024
MAX_METADATA_DEPTH = 16
#: The native body modes that hold the headers until the body hook's result: buffered, buffered partial.
_HOLDING = (1, 3)
#: Envoy's per-connection buffer limit by default: what BUFFERED_PARTIAL hands the hook at most.
BUFFER_LIMIT = 1024 * 1024


def _name_problem(name: Any, pseudo_ok: bool) -> str | None:
    if type(name) is not bytes or not 0 < len(name) <= MAX_HEADER_NAME:
        return f"header name {name!r}"
    if name[:1] == b":":
        return None if pseudo_ok and name in _SETTABLE_PSEUDO else f"pseudo-header {name!r} here"
    return None if _TOKEN.issuperset(name) else f"header name {name!r}"


def _value_problem(name: bytes, value: Any) -> str | None:
    if type(value) is not bytes or len(value) > MAX_HEADER_VALUE:
        return f"header value of {name!r}"
    controls = any(c in value for c in (b"\0", b"\r", b"\n", b"\x7f"))
    if controls or (value and (value[:1] in b" \t" or value[-1:] in b" \t")):
        return f"header value of {name!r}: {value!r}"
    if name == b":status" and not (len(value) == 3 and value.isdigit() and 200 <= int(value) <= 599):
        return f":status {value!r}"
    return None


def _ops_problem(ops: Any, pseudo_ok: bool) -> str | None:
    if type(ops) is not tuple or len(ops) > MAX_HEADER_OPS:
        return "header ops"
    for op in ops:
        if type(op) is not tuple or len(op) != 3 or type(op[0]) is not int or op[0] not in (0, 1, 2):
            return f"header op {op!r}"
        problem = _name_problem(op[1], pseudo_ok and op[0] == 0)
        if problem is None:
            problem = (None if op[2] is None else "a remove with a value") if op[0] == 2 else _value_problem(*op[1:])
        if problem:
            return problem
    return None


def _value_problem_in_metadata(value: Any, depth: int) -> str | None:
    """A metadata value as C takes it: exact JSON-like types, at most MAX_METADATA_DEPTH deep."""
    kind = type(value)
    if value is None or kind is bool or (kind is float and value == value and abs(value) != float("inf")):
        return None
    if kind is int:
        try:
            float(value)
        except OverflowError:
            return "a metadata int too large for a number"
        return None
    if kind is str:
        return None if len(value.encode()) <= MAX_METADATA_STRING else "a metadata string too long"
    if kind is not dict and kind is not list:
        return f"metadata value {kind.__name__}"
    if depth >= MAX_METADATA_DEPTH:
        return "metadata nested too deep"
    if kind is dict and any(type(k) is not str for k in value):
        return "a metadata dict key that is not a str"
    for item in value.values() if kind is dict else value:
        problem = _value_problem_in_metadata(item, depth + 1)
        if problem:
            return problem
    return None


def _metadata_problem(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if type(metadata) is not tuple or len(metadata) > MAX_METADATA_ENTRIES:
        return "metadata"
    for entry in metadata:
        if type(entry) is not tuple or len(entry) != 3:
            return f"metadata entry {entry!r}"
        namespace, key, value = entry
        for text in (namespace, key):
            if type(text) is not str or not 0 < len(text.encode()) <= MAX_METADATA_NAME:
                return f"metadata name {text!r}"
        problem = _value_problem_in_metadata(value, 0)
        if problem:
            return problem
    return None


def check_result(result: Any, phase: str, *, held: bool, max_body: int = MAX_BODY) -> Any:
    """The result as the native module accepts it (strictly), or BadResult. `held`: the phase's headers are
    still held (a headers phase, or a buffered body), so header ops may apply."""
    if result is None:
        return None
    if type(result) is not tuple or not result or type(result[0]) is not int:
        raise BadResult(f"{phase}: not a result tuple: {type(result).__name__}")
    kind, problem = result[0], "not one of the contract's results"
    if kind == 2 and len(result) == 1:
        return result
    if kind == 0 and len(result) == 4:
        _, ops, body, metadata = result
        problem = _ops_problem(ops, phase.endswith("headers")) or _metadata_problem(metadata) or ""
        if ops and not held:
            problem = "header ops where the headers already went on"
        if body is not None and (type(body) is not bytes or "body" not in phase or len(body) > max_body):
            problem = "a body"
    elif kind == 1 and len(result) == 6:
        _, status, headers, body, details, metadata = result
        problem = _metadata_problem(metadata) or ""
        if problem:
            pass
        elif type(status) is not int or not 200 <= status <= 599:
            problem = f"RESPOND status {status!r}"
        elif type(headers) is not tuple or len(headers) > MAX_HEADER_OPS:
            problem = "RESPOND headers"
        elif type(body) is not bytes or len(body) > max_body:
            problem = "RESPOND body"
        elif type(details) is not str or len(details) > MAX_DETAILS or not _DETAIL_TOKEN.issuperset(details.encode()):
            problem = f"RESPOND details {details!r}"
        for header in headers if not problem else ():
            if type(header) is not tuple or len(header) != 2:
                problem = f"RESPOND header {header!r}"
            else:
                problem = _name_problem(header[0], False) or _value_problem(*header) or ""
            if problem:
                break
    if problem:
        raise BadResult(f"{phase}: the native module would refuse {problem}"[:300])
    return result


class _Exchange:
    """One request through the simulated filter chain."""

    def __init__(self, double: InProcessDouble, handle: int) -> None:
        self.double = double
        self.config = double.config
        self.handle = handle
        self.event = double.native.open(handle)
        self.stream: Any = None
        self.result = Result(upstream=None, response=Message(Headers()), status=0, immediate=False)
        self.client_has_headers = False

    def call(self, phase: str, *args: Any, held: bool) -> Any:
        """One hook call as C makes it; PENDING waits for schedule and resumes. A BadResult on a fault."""
        if self.stream is None:
            self.stream = self.config.new_stream(self.handle)
        self.result.phases.append(phase)
        self.event.clear()
        try:
            result = check_result(getattr(self.stream, phase)(*args), phase, held=held)
            if result == (2,):
                if not self.event.wait(self.double.resume_timeout):
                    raise AssertionError(f"{phase}: PENDING but the bridge never scheduled: Envoy would hang")
                result = check_result(self.stream.resume(), phase, held=held)
                if result == (2,):
                    raise BadResult(f"{phase}: resume() returned PENDING")
        except BadResult:
            raise
        except Exception as exc:
            raise BadResult(f"{phase}: {type(exc).__name__}: {exc}") from exc
        metadata = None if result is None or result[0] == 2 else result[-1]
        if metadata:
            for namespace, key, value in metadata:
                self.result.dynamic_metadata.setdefault(namespace, {})[key] = value
        return result

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.result.rejected_mutations = list(self.stream.rejected)
        self.double.native.gone(self.handle)

    def reply(self, result: tuple[Any, ...]) -> None:
        """A RESPOND: Envoy's local reply, unless the client has the response's headers (then a reset)."""
        if self.client_has_headers:
            self.result.response.complete = False
            return
        _, status, headers, body, _details, _metadata = result
        reply = Headers([(":status", str(status))])
        for name, value in headers:
            reply._add(name.decode("latin-1"), value)
        self.result.immediate = True
        self.result.status = status
        self.result.response = Message(reply, body)
        _local_reply_framing(self.result.response)

    def fault(self, why: str) -> None:
        self.result.failed = why
        self.reply((1, 500, (), b"", FAULT_DETAILS, None))


def _apply(ops: Sequence[tuple[int, bytes, bytes | None]], headers: Headers) -> None:
    for op, raw_name, value in ops:
        name = raw_name.decode("latin-1")
        if op == 0:
            headers._put(name, value)  # type: ignore[arg-type]  # checked: set has a value
        elif op == 1:
            headers._add(name, value)  # type: ignore[arg-type]
        else:
            headers._discard(name)


def _first_part(chunks: list[bytes], limit: int) -> tuple[bytes, bytes]:
    """BUFFERED_PARTIAL as Envoy buffers it: whole chunks until the buffer reaches `limit` (or the body ends);
    (what the hook gets, what then passes unprocessed)."""
    taken = 0
    for count, chunk in enumerate(chunks, 1):
        taken += len(chunk)
        if taken >= limit:
            return b"".join(chunks[:count]), b"".join(chunks[count:])
    return b"".join(chunks), b""


def _is_reply(result: Any) -> bool:
    return isinstance(result, tuple) and len(result) == 6 and result[0] == 1


def _envoy_pairs(headers: Headers) -> list[tuple[str, bytes]]:
    """What the native module hands the bridge: a fresh list of Envoy's (lower-case name, raw value) pairs."""
    return list(headers._items)


class InProcessDouble:
    """The native filter in memory, in front of a scripted upstream."""

    def __init__(
        self,
        config_path: str | Path,
        chain: str = "default",
        *,
        hook_deadline_ms: int = 1000,
        buffer_limit: int = BUFFER_LIMIT,
    ) -> None:
        self.native = NativeDouble()
        filter_config = {
            "factory": "sidecar.inprocess.bridge:configure",
            "config": str(Path(config_path).resolve()),
            "chain": chain,
            "site": [],
            "hook_deadline_ms": hook_deadline_ms,
        }
        self.config = configure(json.dumps(filter_config), self.native)
        #: How long PENDING may last before the double calls it a hang (the bridge's deadlines are shorter).
        self.resume_timeout = hook_deadline_ms / 1000 * 4 + 5
        #: Envoy's buffer limit for the stream (its per-connection one), what a BUFFERED_PARTIAL hook gets at most.
        self.buffer_limit = buffer_limit
        self._handles = itertools.count(1)  # thread-safe: two "workers" may run requests at once

    def run(self, request: Request, response: Response | None = None) -> Result:
        exchange = _Exchange(self, next(self._handles))
        try:
            self._run(exchange, request, response or Response())
        except BadResult as exc:
            exchange.fault(str(exc))
        finally:
            exchange.close()
        return exchange.result

    def _body(
        self,
        ex: _Exchange,
        direction: str,
        body: bytes | Sequence[bytes],
        trailers: bool,
        headers: Headers,
        passed: Message,
    ) -> tuple[Any, ...]:
        """The body through the filter: (what goes on, its chunks), or a RESPOND result."""
        chunks = [c for c in ([body] if isinstance(body, bytes) else list(body)) if c]
        mode = getattr(self.config, f"{direction}_body_mode")
        phase = f"{direction}_body"
        if not chunks or mode == 0 or not self.config.phases & BITS[phase]:
            passed.body, passed.chunks = b"".join(chunks), list(chunks)
            return b"".join(chunks), chunks
        if mode in (1, 3):
            whole = b"".join(chunks)
            given, rest = (whole, b"") if mode == 1 else _first_part(chunks, self.buffer_limit)
            # Trailers end a held body too: the one call then says the body goes on (end_of_stream False).
            result = ex.call(phase, given, mode == 1 or (not rest and not trailers), held=True)
            if _is_reply(result):
                return tuple(result)
            if result is not None:
                _apply(result[1], headers)
                if result[2] is not None:
                    given = result[2]
            parts = [part for part in (given, rest) if part]
            passed.body, passed.chunks = given + rest, parts
            return given + rest, parts
        framed = direction == "request" and "content-length" in headers
        out: list[bytes] = []
        for chunk, end in _body_messages(BodyMode.STREAMED, chunks, framed=framed, trailers=trailers):
            result = ex.call(phase, chunk, end, held=False)
            if _is_reply(result):
                return tuple(result)
            new = chunk if result is None or result[2] is None else result[2]
            if new:
                out.append(new)
                passed.body += new
                passed.chunks.append(new)
        return b"".join(out), out

    def _run(self, ex: _Exchange, request: Request, response: Response) -> None:
        phases = self.config.phases
        result = ex.result
        req_headers = _request_headers(request)
        has_body = _has_body(request.body)
        answer = ex.call(
            "request_headers",
            _envoy_pairs(req_headers),
            not has_body and not request.trailers,
            held=True,
        )
        if _is_reply(answer):
            return ex.reply(answer)
        if answer is not None:
            _apply(answer[1], req_headers)
        upstream = Message(req_headers, complete=False)
        if (has_body or request.trailers) and self.config.request_body_mode not in _HOLDING:
            result.upstream = upstream  # the headers went on; a reply during the upload comes after them
        body = self._body(ex, "request", request.body, bool(request.trailers), req_headers, upstream)
        if _is_reply(body):
            return ex.reply(body)
        req_trailers = Headers(_pairs(request.trailers))
        if request.trailers and phases & BITS["request_trailers"]:
            answer = ex.call("request_trailers", _envoy_pairs(req_trailers), held=True)
            if _is_reply(answer):
                return ex.reply(answer)
            if answer is not None:
                _apply(answer[1], req_trailers)
        result.upstream = Message(req_headers, body[0], req_trailers, body[1])

        resp_headers = Headers([(":status", str(response.status)), *_pairs(response.headers)])
        has_body = any(response.body) if not isinstance(response.body, bytes) else bool(response.body)
        if phases & BITS["response_headers"]:
            answer = ex.call("response_headers", _envoy_pairs(resp_headers), not has_body, held=True)
            if _is_reply(answer):
                return ex.reply(answer)
            if answer is not None:
                _apply(answer[1], resp_headers)
        result.status = int(resp_headers[":status"])
        under_way = result.response = Message(resp_headers, complete=False)
        ex.client_has_headers = not has_body or self.config.response_body_mode not in _HOLDING
        resp = self._body(ex, "response", response.body, bool(response.trailers), resp_headers, under_way)
        if _is_reply(resp):
            return ex.reply(resp)
        ex.client_has_headers = True
        resp_trailers = Headers(_pairs(response.trailers))
        if response.trailers and phases & BITS["response_trailers"]:
            answer = ex.call("response_trailers", _envoy_pairs(resp_trailers), held=True)
            if _is_reply(answer):
                return ex.reply(answer)  # the body went on: the reply cuts the response
            if answer is not None:
                _apply(answer[1], resp_trailers)
        result.status = int(resp_headers[":status"])
        result.response = Message(resp_headers, resp[0], resp_trailers, resp[1])


# ---- comparing with the ext_proc path --------------------------------------------------------------------------


def metadata_differences(ext_proc: dict[str, Any], in_process: dict[str, Any]) -> list[str]:
    """Dynamic metadata must be the same on both paths: nested values as values (not JSON text), and the
    metadata of a phase that ends in a reply or a failure set too. (A whole number is equal to its float, as
    the Struct ext_proc writes has one number type.)"""
    return [] if ext_proc == in_process else [f"metadata: ext_proc {ext_proc}, in-process {in_process}"]


def replied(script: dict[str, Any], seen: Any) -> bool:
    """Some phase ended in a reply or a failure: the script says so (tests/support/differential.py), or what the
    client saw does (a plugin's error id, a cut response)."""
    text = json.dumps(script)
    failed = seen.cut or any(name == "x-sidecar-error-id" for name, _ in seen.headers)
    return failed or '"respond"' in text or '"raise"' in text
