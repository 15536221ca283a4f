"""One HTTP stream inside Envoy: the chain's hooks for each phase the native module hands over, and the Result
tuples it applies.

The semantics are the ext_proc server's (`sidecar.extproc.processor`), phase by phase: request hooks in chain
order, response hooks in reverse; a Respond ends the phase; whatever else a hook returns is that plugin's error; a
failure gets the chain's policy (fail_closed: a 500 with an error id, or a 504 past the hook deadline as Envoy's
message_timeout answers; fail_open: the plugin's changes dropped and the plugin bypassed for the rest of the
stream); every reply carries the metadata the phase's hooks set before it; a buffered body that changes keeps
content-length right; Envoy's default header mutation rules apply (what ext_proc's filter would silently drop is
dropped and counted); a body that goes on as it comes loses its content-length, as ext_proc's filter does.

Each phase is a generator: sync hooks run inline on Envoy's worker; at the first `async def` hook the
generator yields the hook's coroutine and the rest of the phase runs on the loop thread (`loop.py`), which
awaits each coroutine under the hook deadline and sends the result back in. The worker gets PENDING and, once
the bridge called `native.schedule(handle)`, `resume()` hands it the phase's result.

C calls `request_headers` with a third argument, the request's first x-request-id value (b"" for none), which the
module meets while it builds the list anyway.

What C gets (docs: the contract): None, (0, header_ops, body, metadata), (1, status, headers, body, details,
metadata) or (2,). Metadata is None or (namespace, key, value) items, each value JSON-like (str, int, float,
bool, None, dict, list), nested at most MAX_METADATA_DEPTH deep.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from time import perf_counter
from typing import Any

from sidecar.chains import Chain, Hook
from sidecar.errors import ProtocolError
from sidecar.headers import Headers
from sidecar.inprocess.loop import LoopThread
from sidecar.inprocess.meters import BUCKETS, Meters
from sidecar.logs import log_plugin_failure
from sidecar.plugins import BodyMode, Context, Respond

__all__ = ["CONTINUE", "PENDING", "RESPOND", "BridgeStream", "StreamPlan"]

log = logging.getLogger("sidecar.inprocess")

CONTINUE, RESPOND = 0, 1
PENDING = (2,)
SET, APPEND, REMOVE = 0, 1, 2

#: Envoy's mapping of an HTTP status to a gRPC one for its local replies (Grpc::Utility::httpToGrpcStatus).
_GRPC_OF_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
_GRPC_UNKNOWN = 2

#: The ext_proc path's reply to a failed plugin in a fail_closed chain.
_ERROR_BODY = b"Internal Server Error\n"
_ERROR_DETAILS = "sidecar_plugin_error"

#: ... and to a hook past its deadline, as Envoy's ext_proc answers a message past its `message_timeout`: 504 with
#: no body (plus the error id, for the log line).
_TIMEOUT_BODY = b""
_TIMEOUT_DETAILS = "sidecar_hook_timeout"
#: How an awaited hook's deadline reads (the log line), and how the failure policy tells it from other failures.
_DEADLINE_TEXT = "the hook ran past the in-process hook deadline"
#: How deep a dict/list metadata value may nest, and how long one of its strings may be (the native module
#: refuses more).
MAX_METADATA_DEPTH = 16
MAX_METADATA_STRING = 64 * 1024

# Phases as bits; within a direction a phase may not come after a later one, nor twice (bodies may).
_BIT = {
    "request_headers": 1,
    "request_body": 2,
    "request_trailers": 4,
    "response_headers": 8,
    "response_body": 16,
    "response_trailers": 32,
}
_LATER = {
    # A response first means a filter before this one answered: the request side never starts after it.
    "request_headers": 2 | 4 | 8 | 16 | 32,
    "request_body": 4,
    "request_trailers": 0,
    "response_headers": 16 | 32,
    "response_body": 32,
    "response_trailers": 0,
}
_BODIES = 2 | 16
_RESPONSE_SIDE = 8 | 16 | 32

# Envoy's default HeaderMutationRules in its ext_proc filter: these changes are dropped (and counted).
_PROTECTED_SET = frozenset({":method", ":authority", ":scheme", "host"})
_PROTECTED_PREFIX = "x-envoy"

#: Guards a pending phase's settling against the stream's close (held for a schedule() call: microseconds).
_SETTLING = threading.Lock()

#: The longest `ctx.extend_timeout` honoured (seconds), as the generated ext_proc configs allow (or the hook
#: deadline, if that is longer).
MAX_EXTENSION = 10.0

#: A hook finished without ending its phase: the next one runs.
_GO_ON = object()
_TRAILERS = frozenset({"request_trailers", "response_trailers"})
_REQUEST = frozenset({"request_headers", "request_body", "request_trailers"})
Result = tuple[Any, ...] | None


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """What every stream of one in-process filter needs, computed once at configure."""

    chain: Chain
    meters: Meters
    #: `native.schedule(handle) -> bool`, callable from any thread.
    schedule: Callable[[int], bool]
    #: The loop thread for async hooks (None: the chain has none).
    runner: LoopThread | None
    #: Seconds an awaited hook may take before it gets the chain's failure policy.
    hook_deadline: float
    #: The chain's body mode per direction (request, response): NONE, BUFFERED, BUFFERED_PARTIAL, STREAMED.
    body_modes: tuple[int, int]
    #: Async hooks per phase: how long the watchdog waits for a pending phase (one deadline each, plus one).
    async_hooks: dict[str, int]
    #: Per phase, the hooks (hook, cell, func, is_async) or body stages (stage, cell), each with its latency cell
    #: in `meters`.
    steps: dict[str, tuple[tuple[Any, ...], ...]]
    #: The chain's [opened, closed] stream counters in `meters`.
    stream_counts: list[int]
    #: The largest body, chunk or reply body the native module takes from a hook (its `max_body_bytes`).
    max_body: int
    #: The chain's, read on every phase (one attribute, not two).
    fail_open: bool
    observe_only: bool

    @classmethod
    def of(
        cls,
        chain: Chain,
        meters: Meters,
        schedule: Callable[[int], bool],
        runner: LoopThread | None,
        hook_deadline: float,
        async_hooks: dict[str, int],
        max_body: int,
    ) -> StreamPlan:
        mode = chain.mode
        steps: dict[str, tuple[tuple[Any, ...], ...]] = {}
        for kind, hooks in chain.hooks.items():
            # A headers or trailers hook with its function and kind at hand (two attribute reads less a call).
            steps[kind] = tuple((hook, meters.cell(hook.plugin, kind), hook.func, hook.is_async) for hook in hooks)
        for direction in ("request", "response"):
            kind = f"{direction}_body"
            steps[kind] = tuple((stage, meters.cell(stage.plugin, kind)) for stage in chain.body_stages[direction])
        return cls(
            chain=chain,
            meters=meters,
            schedule=schedule,
            runner=runner,
            hook_deadline=hook_deadline,
            body_modes=(int(mode.request_body_mode), int(mode.response_body_mode)),
            async_hooks=async_hooks,
            steps=steps,
            stream_counts=meters.streams_of(chain.name),
            max_body=max_body,
            fail_open=chain.fail_open,
            observe_only=chain.observe_only,
        )


class _Await:
    """A phase stopped at an async hook: the hook's coroutine, and how the phase goes on with its outcome."""

    __slots__ = ("awaitable", "go_on", "plugin", "state")

    def __init__(
        self,
        awaitable: Awaitable[Any],
        go_on: Callable[[tuple[Any, ...], Any, BaseException | None], Result | _Await],
        plugin: str,
        state: tuple[Any, ...],
    ) -> None:
        self.awaitable = awaitable
        self.go_on = go_on
        self.plugin = plugin
        self.state = state


class _Pending:
    """A phase running on the loop thread; settled once, by the loop or by the watchdog."""

    __slots__ = ("backstop", "kind", "loop", "result", "settled", "task")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.result: Result | BaseException = None
        self.settled = False
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.backstop = -1


class BridgeStream:
    """The ext_proc processor's semantics for one HTTP stream, driven by the native module's calls."""

    __slots__ = (
        "_awaited",
        "_broken",
        "_closed",
        "_disabled",
        "_done",
        "_pending",
        "_plan",
        "_timeout",
        "ctx",
        "handle",
        "rejected",
    )

    def __init__(self, plan: StreamPlan, handle: int) -> None:
        chain = plan.chain
        self._plan = plan
        self.handle = handle
        # `ctx.extend_timeout` is given a way out only while a phase is pending (`_suspend`): a stream that
        # points at itself from its Context is a cycle, which only the garbage collector frees (2 µs a request).
        self.ctx = Context(chain.name, "", None, chain.writable_namespaces)  # positional: no keyword parsing
        #: fail_open: plugins bypassed for the rest of this stream (a new set on the first: most streams have none).
        self._disabled: frozenset[str] = frozenset()
        self._done = 0  # the phases seen, as bits of _BIT
        self._pending: _Pending | None = None
        self._awaited = ""  # the plugin whose async hook was awaited last (for the watchdog's log line)
        self._timeout: asyncio.Timeout | None = None  # the awaited hook's deadline, for ctx.extend_timeout
        self._closed = False
        #: The watchdog settled a phase whose hook may still run: no hook of this stream runs again.
        self._broken = False
        #: Header changes Envoy's mutation rules dropped, as "set name" / "remove name" (the Driver's list).
        self.rejected: tuple[str, ...] = ()
        plan.stream_counts[0] += 1

    # -- what C calls ------------------------------------------------------------------------------

    # The two headers phases are every request's: their order check and `_run` are inlined (the same checks).

    def request_headers(
        self, headers: list[tuple[str, bytes]], end_of_stream: bool, request_id: bytes | None = None
    ) -> Result:
        """`request_id`: the native module's first x-request-id value from `headers` (b"": none), so the list is not
        scanned for it; None (not handed over) looks it up."""
        if self._done:  # not the first phase: out of order (raises), as `_order` says
            self._order("request_headers")
        self._done = 1
        view = _headers(headers)
        ctx = self.ctx
        ctx.request_headers = view
        if request_id is None:
            request_id = view.raw("x-request-id")
        ctx.request_id = request_id.decode("latin-1") if request_id else Context.new_request_id()
        answer = self._fields("request_headers", view, end_of_stream, 0)
        if type(answer) is _Await:
            return self._suspend("request_headers", answer)
        return None if self._plan.observe_only else answer  # type: ignore[return-value]  # not an _Await here

    def response_headers(self, headers: list[tuple[str, bytes]], end_of_stream: bool) -> Result:
        if self._done & _RESPONSE_SIDE or self._pending is not None or self._broken:
            if self._order("response_headers"):
                return self._given_up()
        else:
            self._done |= 8
        view = _headers(headers)
        ctx = self.ctx
        ctx.response_headers = view
        if not ctx.request_id:  # a local reply from a filter before this one: no request headers came
            ctx.request_id = Context.new_request_id()
        answer = self._fields("response_headers", view, end_of_stream, 0)
        if type(answer) is _Await:
            return self._suspend("response_headers", answer)
        return None if self._plan.observe_only else answer  # type: ignore[return-value]  # not an _Await here

    def request_body(self, chunk: bytes, end_of_stream: bool) -> Result:
        if self._order("request_body"):
            return self._given_up()
        return self._run("request_body", self._body("request_body", 0, chunk, end_of_stream, 0, chunk))

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Result:
        if self._order("response_body"):
            return self._given_up()
        return self._run("response_body", self._body("response_body", 1, chunk, end_of_stream, 0, chunk))

    def request_trailers(self, trailers: list[tuple[str, bytes]]) -> Result:
        if self._order("request_trailers"):
            return self._given_up()
        return self._run("request_trailers", self._fields("request_trailers", _headers(trailers), True, 0))

    def response_trailers(self, trailers: list[tuple[str, bytes]]) -> Result:
        if self._order("response_trailers"):
            return self._given_up()
        return self._run("response_trailers", self._fields("response_trailers", _headers(trailers), True, 0))

    def resume(self) -> Result:
        """The result of the phase that was PENDING, once the bridge called `native.schedule`."""
        pending = self._pending
        if pending is None or not pending.settled:
            raise ProtocolError("resume() without a finished pending phase")
        self._pending = None
        self.ctx._send = None
        result = pending.result
        if isinstance(result, BaseException):  # a bridge bug on the loop thread: C answers 500
            raise RuntimeError(f"{pending.kind}: the in-process bridge failed: {type(result).__name__}") from result
        return None if self._plan.observe_only else result

    def close(self) -> None:
        """The stream is gone (Envoy destroyed the filter): no schedule() for it after this returns."""
        if self._closed:
            return
        plan = self._plan
        runner = plan.runner
        if runner is None:  # no async hook: nothing pending, nothing settles this stream from another thread
            self._closed = True
            plan.stream_counts[1] += 1
            return
        try:
            with _SETTLING:
                if self._closed:
                    return
                self._closed = True
            self.ctx._send = None
            pending = self._pending
            if pending is not None and not pending.settled:
                self._stop(pending)
                runner.watchdog.disarm(pending.backstop)
            plan.stream_counts[1] += 1
        except Exception:  # never raises into C
            log.exception("closing an in-process stream failed")

    # -- running a phase ---------------------------------------------------------------------------

    def _order(self, kind: str) -> bool:
        """The native module keeps the ext_proc order of phases; a break is its bug, failed closed. True when
        the watchdog gave up on this stream (no hook of it runs again)."""
        if self._pending is not None:
            raise ProtocolError(f"{kind} arrived while {self._pending.kind} is pending")
        bit = _BIT[kind]
        done = self._done
        if done & _LATER[kind] or (done & bit and not bit & _BODIES):  # bodies may repeat
            raise ProtocolError(f"{kind} arrived out of order")
        if bit & 6 and not done & 1:  # the response side may come alone (a local reply from an earlier filter)
            raise ProtocolError(f"{kind} arrived before request_headers")
        self._done = done | bit
        return self._broken

    def _run(self, kind: str, answer: Result | _Await) -> Result:
        if type(answer) is _Await:
            return self._suspend(kind, answer)
        # Observe-only chains (ext_proc's observability mode): Envoy does not wait for or apply an answer.
        return None if self._plan.observe_only else answer  # type: ignore[return-value]

    def _given_up(self) -> Result:
        """A phase after the watchdog gave up on this stream: its plugins' state is unknown."""
        if self._plan.chain.fail_open:
            return None
        return self._error_reply("watchdog")

    def _suspend(self, kind: str, waiting: _Await) -> Result:
        plan = self._plan
        runner = plan.runner
        if runner is None:  # an async hook the chain did not declare at configure (a hook swapped later)
            _close(waiting.awaitable)
            raise ProtocolError(f"{kind}: an async hook ran, but the chain's filter has no event loop")
        pending = self._pending = _Pending(kind)
        self._awaited = waiting.plugin
        self.ctx._send = self._extend  # undone by resume() and close()
        budget = plan.hook_deadline * (plan.async_hooks.get(kind, 1) + 1)
        pending.backstop = runner.watchdog.arm(time.monotonic() + budget, partial(self._backstop, pending))
        pending.loop = runner.submit(self._start, pending, waiting)
        return PENDING

    def _start(self, pending: _Pending, waiting: _Await) -> None:
        """On the loop thread: the rest of the phase as a task."""
        if self._closed or pending.settled:
            _close(waiting.awaitable)
            return
        pending.task = asyncio.get_running_loop().create_task(self._drive(pending, waiting))

    async def _drive(self, pending: _Pending, waiting: _Await) -> None:
        """Await each async hook of the phase under the hook deadline; the phase's sync hooks after one run here."""
        deadline = self._plan.hook_deadline
        while True:
            self._awaited = waiting.plugin
            error: BaseException | None = None
            value: Any = None
            timeout = self._timeout = asyncio.timeout(deadline)  # not wait_for: see extproc/duplex.py
            try:
                async with timeout:
                    value = await waiting.awaitable
            except TimeoutError as exc:
                error = exc
                if timeout.expired():
                    error = TimeoutError(f"{_DEADLINE_TEXT} ({deadline * 1000:g} ms)")
                elif not exc.args:  # the hook's own bare TimeoutError (asyncio.wait_for): not our deadline
                    error = TimeoutError("the hook raised TimeoutError")
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the stream is gone (close) or the watchdog answered: nothing to settle
                error = RuntimeError("the hook raised CancelledError")  # its own, not ours: a failure like any
            except BaseException as exc:  # SystemExit too: on the loop thread it would end the phase unanswered
                error = exc if isinstance(exc, Exception) else RuntimeError(f"the hook raised {type(exc).__name__}")
            try:
                answer = waiting.go_on(waiting.state, value, error)
            except Exception as exc:  # the bridge's own bug: C answers 500
                self._settle(pending, exc)
                return
            if type(answer) is not _Await:
                self._settle(pending, answer)  # type: ignore[arg-type]
                return
            waiting = answer

    def _settle(self, pending: _Pending, result: Result | BaseException) -> None:
        with _SETTLING:
            if pending.settled:
                return
            pending.settled = True
            pending.result = result
            if self._closed:
                return
            runner = self._plan.runner
            if runner is not None:
                runner.watchdog.disarm(pending.backstop)
            # Inside the lock: close() waits for this call, so no schedule() follows a closed stream.
            self._plan.schedule(self.handle)

    def _backstop(self, pending: _Pending) -> None:
        """The watchdog's: a pending phase outlived its deadlines (its hook blocks the loop thread or
        ignored its cancellation). It gets the chain's policy now; the stream runs no more hooks."""
        if pending.settled or self._closed:
            return
        plan = self._plan
        plan.meters.backstops += 1
        self._broken = True
        exc = TimeoutError(f"{_DEADLINE_TEXT}s of {pending.kind}; the event loop did not answer")
        if plan.chain.fail_open:
            self._log_failure(pending.kind, self._awaited, exc)
            result: Result = None
        else:
            result = self._failed(pending.kind, self._awaited, exc)
        runner = plan.runner
        loop = pending.loop
        if runner is not None and loop is not None and runner.stuck(loop, plan.hook_deadline):
            runner.replace(loop)  # before the stream goes on: its next async hook needs a turning loop
        self._settle(pending, result)
        self._stop(pending)

    def _stop(self, pending: _Pending) -> None:
        task, loop = pending.task, pending.loop
        if task is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    async def _extend(self, message: Any) -> None:
        """`ctx.extend_timeout(seconds)` in-process: the awaited hook's deadline moves to `seconds` from now, at
        most MAX_EXTENSION (as Envoy caps ext_proc's at the filter's max_message_timeout), and so does the
        watchdog's backstop. Only an async hook can await it, and only on the loop thread."""
        timeout, pending = self._timeout, self._pending
        if timeout is None or pending is None or pending.settled:
            raise RuntimeError("extend_timeout() needs a running stream")
        seconds = min(message.override_message_timeout.ToTimedelta().total_seconds(), self._max_extension())
        timeout.reschedule(asyncio.get_running_loop().time() + seconds)
        runner = self._plan.runner
        if runner is not None:
            runner.watchdog.disarm(pending.backstop)
            later = time.monotonic() + seconds + self._plan.hook_deadline
            pending.backstop = runner.watchdog.arm(later, partial(self._backstop, pending))

    def _max_extension(self) -> float:
        return max(MAX_EXTENSION, self._plan.hook_deadline)

    # -- failure policy (the ext_proc processor's) -------------------------------------------------

    def _log_failure(self, kind: str, plugin: str, exc: BaseException) -> str:
        error_id = log_plugin_failure(log, self._plan.chain.name, kind, plugin, exc, self.ctx.request_id)
        self._plan.meters.plugin_error(plugin, kind, error_id)
        return error_id

    def _skip(self, kind: str, plugin: str, exc: BaseException) -> None:
        self._log_failure(kind, plugin, exc)
        self._disabled = self._disabled | {plugin}

    def _failed(self, kind: str, plugin: str, exc: BaseException) -> Result:
        error_id = self._log_failure(kind, plugin, exc)
        if _past_deadline(exc):
            return self._error_reply(error_id, 504, _TIMEOUT_BODY, _TIMEOUT_DETAILS)
        return self._error_reply(error_id)

    def _error_reply(
        self, error_id: str, status: int = 500, body: bytes = _ERROR_BODY, details: str = _ERROR_DETAILS
    ) -> Result:
        """The failure policy's reply, with the metadata the phase's hooks set before it (ext_proc keeps it)."""
        headers: tuple[tuple[bytes, bytes], ...] = ((b"x-sidecar-error-id", error_id.encode()),)
        if body:
            headers = ((b"content-type", b"text/plain"), *headers)
        headers = self._grpc_status(headers, status, None)
        try:
            metadata = self._metadata()
        except (TypeError, ValueError) as exc:  # the reply fails closed anyway; say why the metadata is not there
            self._log_failure("metadata", "set_metadata", exc)
            metadata = None
        return (RESPOND, status, headers, body, details, metadata)

    def _grpc_status(
        self, headers: tuple[tuple[bytes, bytes], ...], status: int, grpc_status: int | None
    ) -> tuple[tuple[bytes, bytes], ...]:
        """A reply to a gRPC request names its gRPC status, as Envoy's ext_proc reply does (the given one, else
        Envoy's mapping of the HTTP status). Envoy's dynamic-module reply says `grpc-status: 0` otherwise: OK,
        to a client that was denied or failed."""
        request = self.ctx.request_headers
        kind = request.raw("content-type") if request is not None else None
        if not kind or not kind.startswith(b"application/grpc") or any(n == b"grpc-status" for n, _ in headers):
            return headers
        code = grpc_status if grpc_status is not None else _GRPC_OF_HTTP.get(status, _GRPC_UNKNOWN)
        return (*headers, (b"grpc-status", b"%d" % code))

    def _too_big(self, hook: str, what: str, size: int) -> ValueError:
        return ValueError(
            f"{hook} {what} of {size} bytes; the in-process filter passes at most {self._plan.max_body} "
            "(max_body_bytes)"
        )

    def _respond(self, respond: Respond) -> Result:
        """A Respond as C's RESPOND; a reply body over max_body_bytes is the plugin's error (raised in its hook's
        try), as C would refuse it."""
        body = respond.body.encode() if isinstance(respond.body, str) else respond.body
        if len(body) > self._plan.max_body:
            raise self._too_big("a Respond", "has a body", len(body))
        headers = []
        for name, value in respond.header_pairs:  # checked when the Respond was built
            if name.startswith(_PROTECTED_PREFIX):  # what ext_proc's mutation rules drop from a reply too
                self._reject(f"set {name}")
                continue
            headers.append((name.encode(), value.encode("latin-1")))
        replied = self._grpc_status(tuple(headers), respond.status, respond.grpc_status)
        return (RESPOND, respond.status, replied, body, _details(respond.details), self._metadata())

    def _reject(self, change: str) -> None:
        self.rejected = (*self.rejected, change)
        self._plan.meters.rejected_mutations += 1

    # -- the phases --------------------------------------------------------------------------------

    # Each phase is a plain loop over its hooks from `start`. At an `async def` hook it returns an _Await: the
    # loop thread awaits the coroutine and hands the outcome to `go_on`, which finishes that hook the way the
    # loop would have and runs the phase on from the next hook. Sync phases never build anything for that.

    def _fields(self, kind: str, fields: Headers, end_of_stream: bool, start: int) -> Result | _Await:
        """A headers or a trailers phase, from hook `start`."""
        ctx = self.ctx
        plan = self._plan
        fail_open = plan.fail_open
        steps = plan.steps[kind]
        deadline = plan.hook_deadline
        before = None
        for step in steps[start:] if start else steps:
            hook, cell, func, is_async = step
            if fail_open:
                if hook.plugin in self._disabled:
                    continue
                before = fields.snapshot()
            started = perf_counter()
            try:
                result = func(ctx, fields)
                if is_async:
                    index = steps.index(step, start)  # found by identity: each step is its own tuple
                    state = (kind, fields, end_of_stream, index, hook, cell, started, before)
                    return _Await(result, self._fields_go_on, hook.plugin, state)
                elapsed = perf_counter() - started
                if elapsed > deadline:
                    raise _overran(deadline, elapsed)
                if result is None:
                    cell[bisect_left(BUCKETS, elapsed)] += 1
                    cell[-1] += elapsed
                    continue
                answer: Any = self._fields_result(kind, hook, started, result)
            except Exception as exc:
                answer = self._hook_failed(kind, hook.plugin, started, exc, fields, before)
            if answer is not _GO_ON:
                return answer  # type: ignore[no-any-return]
        return self._fields_end(kind, fields, end_of_stream)

    def _fields_go_on(self, state: tuple[Any, ...], value: Any, error: BaseException | None) -> Result | _Await:
        kind, fields, end_of_stream, index, hook, cell, started, before = state
        try:
            if error is not None:
                raise error
            if value is None:
                elapsed = perf_counter() - started
                cell[bisect_left(BUCKETS, elapsed)] += 1
                cell[-1] += elapsed
                answer: Any = _GO_ON
            else:
                answer = self._fields_result(kind, hook, started, value)
        except Exception as exc:
            answer = self._hook_failed(kind, hook.plugin, started, exc, fields, before)
        if answer is not _GO_ON:
            return answer  # type: ignore[no-any-return]
        return self._fields(kind, fields, end_of_stream, index + 1)

    def _fields_result(self, kind: str, hook: Hook, started: float, result: Any) -> Result:
        """A headers or trailers hook returned something: a Respond ends the phase; anything else (403, "403",
        False, the Respond class...) is a broken plugin, never a pass, and so is a Respond in trailers, which
        come after the body went on."""
        if kind in _TRAILERS or not isinstance(result, Respond):
            raise hook.wrong(result)
        answer = self._respond(result)
        self._plan.meters.plugin_ran(hook.plugin, kind, perf_counter() - started, result)
        return answer

    def _fields_end(self, kind: str, fields: Headers, end_of_stream: bool) -> Result:
        request = kind in _REQUEST
        ctx = self.ctx
        if ctx.clear_route_cache_requested:
            refused = self._no_route_cache(kind)
            if refused is not _GO_ON:
                return refused  # type: ignore[return-value]
        ops = self._header_ops(fields, request) if fields._replaced or fields._appended else ()
        if (
            not end_of_stream
            and kind not in _TRAILERS
            and self._drops_length(0 if request else 1)  # before the scan: most chains pass bodies untouched
            and "content-length" in fields
        ):
            # Envoy's ext_proc drops the length of a body it passes on as it comes (the peer gets it chunked):
            # a chunk hook may change the size. Not in `fields`: hooks still see what the client sent.
            ops = (*ops, (REMOVE, b"content-length", None))
        if ctx.dynamic_metadata:
            return self._continue(ops, None)
        return (CONTINUE, ops, None, None) if ops else None

    def _no_route_cache(self, kind: str) -> Result | object:
        """`ctx.clear_route_cache()` has no way to Envoy in-process (the contract carries none): the request would
        go on to the route picked before the plugin's change, silently. Under the chain's policy instead: fail_open
        logs it and goes on (_GO_ON)."""
        self.ctx.clear_route_cache_requested = False
        exc = RuntimeError("ctx.clear_route_cache() is not available in-process: serve this chain from the sidecar")
        if self._plan.chain.fail_open:
            self._log_failure(kind, "clear_route_cache", exc)
            return _GO_ON
        return self._failed(kind, "clear_route_cache", exc)

    def _hook_failed(
        self, kind: str, plugin: str, started: float, exc: Exception, fields: Headers | None, before: Any
    ) -> Result | object:
        """The chain's policy for a hook that raised or broke its contract: fail_closed answers 500; fail_open
        drops what the plugin changed, bypasses it for the rest of the stream and goes on (_GO_ON)."""
        self._plan.meters.plugin_ran(plugin, kind, perf_counter() - started, exc)
        if not self._plan.chain.fail_open:
            return self._failed(kind, plugin, exc)
        self._skip(kind, plugin, exc)
        if fields is not None:
            fields.restore(before)
        return _GO_ON

    def _drops_length(self, direction: int) -> bool:
        mode = self._plan.body_modes[direction]
        return mode == BodyMode.STREAMED or mode == BodyMode.BUFFERED_PARTIAL

    def _body(
        self, kind: str, direction: int, chunk: bytes, end_of_stream: bool, start: int, body: bytes
    ) -> Result | _Await:
        """A body phase from stage `start`; `body` is what the stages before it made of `chunk`."""
        plan = self._plan
        mode = plan.body_modes[direction]
        if mode == BodyMode.NONE:
            raise ProtocolError(f"{kind} arrived but the chain asked for no body")
        # Whole-body and chunk hooks of a BUFFERED chain see the whole body as one final chunk.
        end = True if mode == BodyMode.BUFFERED else end_of_stream
        ctx = self.ctx
        steps = plan.steps[kind]
        for step in steps[start:] if start else steps:
            stage, cell = step
            if stage.plugin in self._disabled:
                continue
            hook = stage.hook
            started = perf_counter()
            try:
                result = hook.func(ctx, body) if stage.kind == "body" else hook.func(ctx, body, end)
                if hook.is_async:
                    index = steps.index(step, start)
                    state = (kind, direction, chunk, end_of_stream, index, stage, cell, started, body)
                    return _Await(result, self._body_go_on, stage.plugin, state)
                elapsed = perf_counter() - started
                if elapsed > plan.hook_deadline:
                    raise _overran(plan.hook_deadline, elapsed)
                answer = self._body_result(kind, stage.plugin, hook, cell, started, result)
            except Exception as exc:
                answer = self._hook_failed(kind, stage.plugin, started, exc, None, None)
            if type(answer) is bytes:
                body = answer
            elif answer is not _GO_ON:
                return answer  # type: ignore[return-value]
        return self._body_end(direction, chunk, body, mode)

    def _body_go_on(self, state: tuple[Any, ...], value: Any, error: BaseException | None) -> Result | _Await:
        kind, direction, chunk, end_of_stream, index, stage, cell, started, body = state
        try:
            if error is not None:
                raise error
            answer = self._body_result(kind, stage.plugin, stage.hook, cell, started, value)
        except Exception as exc:
            answer = self._hook_failed(kind, stage.plugin, started, exc, None, None)
        if type(answer) is bytes:
            body = answer
        elif answer is not _GO_ON:
            return answer  # type: ignore[return-value]
        return self._body(kind, direction, chunk, end_of_stream, index + 1, body)

    def _body_result(
        self, kind: str, plugin: str, hook: Hook, cell: list[float], started: float, result: Any
    ) -> bytes | Result | object:
        """A body or chunk hook's outcome: the new body, a reply (a Respond), or _GO_ON (None: unchanged)."""
        if isinstance(result, Respond):
            reply = self._respond(result)
            self._plan.meters.plugin_ran(plugin, kind, perf_counter() - started, result)
            return reply
        if result is None:
            answer: bytes | object = _GO_ON
        else:
            answer = _as_body(result, hook)
            if len(answer) > self._plan.max_body:  # C would fail the stream closed, whatever the policy
                raise self._too_big(hook.name, "returned a body", len(answer))
        elapsed = perf_counter() - started
        cell[bisect_left(BUCKETS, elapsed)] += 1
        cell[-1] += elapsed
        return answer

    def _body_end(self, direction: int, chunk: bytes, body: bytes, mode: int) -> Result:
        changed = body is not chunk
        ops: tuple[tuple[int, bytes, bytes | None], ...] = ()
        if mode == BodyMode.BUFFERED:
            headers = self.ctx.request_headers if direction == 0 else self.ctx.response_headers
            if headers is not None:
                if changed and "content-length" in headers:
                    # Envoy holds the headers until the body is answered: a stale length would cut the body.
                    headers._put("content-length", str(len(body)).encode())
                ops = self._header_ops(headers, direction == 0)
        return self._continue(ops, body if changed else None)

    def _continue(self, ops: tuple[tuple[int, bytes, bytes | None], ...], body: bytes | None) -> Result:
        metadata = None
        if self.ctx.dynamic_metadata:
            try:
                metadata = self._metadata()
            except (TypeError, ValueError) as exc:  # a value C cannot take: the chain's policy, not a silent drop
                if not self._plan.chain.fail_open:
                    return self._failed("metadata", "set_metadata", exc)
                self._log_failure("metadata", "set_metadata", exc)
        if not ops and body is None and metadata is None:
            return None
        return (CONTINUE, ops, body, metadata)

    def _metadata(self) -> tuple[tuple[str, str, Any], ...] | None:
        """Dynamic metadata the hooks set since the last phase, as (namespace, key, value) items of exact types
        (a copy: a plugin may change its dict after set_metadata). Taken first, so a value that cannot go (too
        deep) fails the phase once, and its failure reply goes without it."""
        ctx = self.ctx
        metadata = ctx.dynamic_metadata
        if not metadata:
            return None
        ctx.dynamic_metadata = {}
        return tuple(
            (namespace, key, _plain(value, key, 0))
            for namespace, values in metadata.items()
            for key, value in values.items()
        )

    def _header_ops(self, headers: Headers, request: bool) -> tuple[tuple[int, bytes, bytes | None], ...]:
        """The smallest list of set/append/remove that turns what Envoy has into `headers` (as
        `Headers.flush_into` writes a HeaderMutation), less what Envoy's mutation rules drop; then tracks
        afresh, so a later phase sends only later changes."""
        replaced, appended = headers._replaced, headers._appended
        if not replaced and not appended:
            return ()
        ops: list[tuple[int, bytes, bytes | None]] = []
        known = _OUT_NAMES.get
        for name, value in sorted(replaced.items()) if len(replaced) > 1 else replaced.items():
            raw, guarded = known(name) or _out_name(name)
            if value is not None:  # a set was its last change: its one value, no scan
                if not (guarded and self._refused(name, value, request, 1)):
                    ops.append((SET, raw, value))
                continue
            values = headers.raw_all(name)
            if guarded and self._refused(name, values[0] if values else None, request, len(values)):
                continue
            if not values:
                ops.append((REMOVE, raw, None))
            else:
                ops.append((SET, raw, values[0]))
                ops += [(APPEND, raw, value) for value in values[1:]]
        for name, added in appended.items():
            raw, guarded = known(name) or _out_name(name)
            if guarded and self._refused(name, added[0], request, len(added)):
                continue
            ops += [(APPEND, raw, value) for value in added]
        replaced.clear()  # track afresh (flush_into's job for ext_proc)
        appended.clear()
        return tuple(ops)

    def _refused(self, name: str, value: bytes | None, request: bool, count: int) -> bool:
        """Whether Envoy's default mutation rules drop this change (each value counted, as Envoy counts them)."""
        if value is None:
            if name[0] == ":" or name.startswith(_PROTECTED_PREFIX) or name == "host":
                self._reject(f"remove {name}")
                return True
            return False
        if name.startswith(_PROTECTED_PREFIX) or (request and name in _PROTECTED_SET):
            refused = True
        else:
            refused = name == ":status" and not (value.isdigit() and 200 <= int(value) <= 999)
        if refused:
            for _ in range(count):
                self._reject(f"set {name}")
        return refused


def _headers(pairs: list[tuple[str, bytes]]) -> Headers:
    """Envoy's header map as a plugin's Headers: the native module hands over the list a Headers holds (lower-case
    names as str, raw values), made for this call, so it is taken as it is. A list of bytes names is a native
    module older than this bridge (a stale build): its names would match nothing a plugin looks for, so a deny
    rule would pass; it fails the phase closed instead."""
    if pairs and type(pairs[0][0]) is not str:
        raise ProtocolError("header names from the native module are not str: rebuild it (pip install) to match")
    headers = Headers.__new__(Headers)
    headers._items = pairs
    headers._replaced = {}
    headers._appended = {}
    return headers


#: For the header ops: a name's bytes and whether Envoy's mutation rules guard it (a pseudo-header, `host`,
#: `x-envoy-*`). Most requests carry the same few dozen names, and a lookup beats encoding and testing each.
#: Bounded in count and length (about 1 MiB at most): other names are encoded each time, never kept (random names
#: cost a call, not memory held for good).
_OUT_NAMES: dict[str, tuple[bytes, bool]] = {}
MAX_NAMES = 4096
MAX_NAME_LENGTH = 64


def _out_name(name: str) -> tuple[bytes, bool]:
    out = (name.encode("latin-1"), name[0] == ":" or name == "host" or name.startswith(_PROTECTED_PREFIX))
    if len(name) <= MAX_NAME_LENGTH and len(_OUT_NAMES) < MAX_NAMES:
        _OUT_NAMES[name] = out
    return out


def _as_body(result: Any, hook: Hook) -> bytes:
    """A body or chunk hook's result as bytes (None and Respond are handled by the caller)."""
    if isinstance(result, bytes):
        return result
    if isinstance(result, str):
        return result.encode()
    if isinstance(result, bytearray | memoryview):
        return bytes(result)
    raise hook.wrong(result)


def _plain(value: Any, key: str, depth: int) -> Any:
    """A metadata value as the native module takes it: str, int, float, bool, None, dict (str keys) and list as
    exactly those types (an IntEnum is an int, a tuple a list), nested at most MAX_METADATA_DEPTH deep, numbers
    a double can hold, strings of valid UTF-8 up to MAX_METADATA_STRING bytes. `ctx.set_metadata` checked it
    was JSON-like; anything C would refuse (a cycle too) fails the phase here, under the chain's policy, with
    the key named."""
    if value is None or type(value) is bool:
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"metadata {key!r}: an int too large for a number") from None
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"metadata {key!r}: {value!r} is not a finite number")
        return float(value)
    if isinstance(value, str):
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            raise ValueError(f"metadata {key!r}: a str that is not valid UTF-8 (a lone surrogate)") from None
        if size > MAX_METADATA_STRING:
            raise ValueError(f"metadata {key!r}: a str of {size} bytes; at most {MAX_METADATA_STRING} in-process")
        return str(value)
    if depth >= MAX_METADATA_DEPTH:
        raise ValueError(f"metadata {key!r}: nested deeper than {MAX_METADATA_DEPTH} levels in-process")
    if isinstance(value, dict):
        return {str(k): _plain(v, key, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, key, depth + 1) for v in value]
    raise TypeError(f"metadata {key!r}: {type(value).__name__} is not JSON-like")


def _overran(deadline: float, elapsed: float) -> TimeoutError:
    """A sync hook that returned past its deadline. The native watchdog interrupts it once with a bare
    TimeoutError, which a plugin catching Exception swallows; it still failed, as under ext_proc, where Envoy
    stops waiting at message_timeout whatever the server does next."""
    return TimeoutError(f"{_DEADLINE_TEXT} ({deadline * 1000:g} ms): it returned after {elapsed * 1000:.0f} ms")


def _past_deadline(exc: BaseException) -> bool:
    """A hook failed at its deadline: the bridge's own TimeoutError, or the bare one the native watchdog raises
    in a sync hook's Python code."""
    return type(exc) is TimeoutError and (not exc.args or str(exc.args[0]).startswith(_DEADLINE_TEXT))


#: Characters of one token in Envoy's response code details (the native module checks them).
_DETAIL_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
MAX_DETAILS = 128


def _details(details: str) -> str:
    """A Respond's details as one token: Envoy's ext_proc turns each whitespace character into an underscore;
    the native module takes only token characters, so any other becomes one too. At most MAX_DETAILS."""
    if not _DETAIL_CHARS.issuperset(details):
        details = "".join(c if c in _DETAIL_CHARS else "_" for c in details)
    return details[:MAX_DETAILS]


def _close(awaitable: Awaitable[Any]) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()
