"""The Python testing API: load a module as Envoy would, then drive its root and HTTP contexts.

plugin = Plugin("filter.wasm", configuration=b'{"header": "x-a"}').start()
http = plugin.http_context()
assert http.on_request_headers([(":path", "/"), ("x-b", "1")], end_of_stream=True) is Action.CONTINUE
assert ("x-a", "1") in http.request_headers
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from sidecar.wasm.host.abi import AbiVersion, Action, LogLevel, MapType, Status
from sidecar.wasm.host.errors import WasmCallError, WasmStateError
from sidecar.wasm.host.imports import CALL_RESPONSE_SCOPE, callout_scope
from sidecar.wasm.host.instance import Instance, InstanceOptions
from sidecar.wasm.host.properties import PropertyValue
from sidecar.wasm.host.state import (
    HeaderList,
    HttpCall,
    HttpCallResponse,
    LocalResponse,
    LogRecord,
    StreamState,
    held,
)
from sidecar.wasm.host.vm import Limits, cache_dir, read_module_bytes

__all__ = ["HttpContext", "HttpResponder", "Plugin", "continues"]

HttpResponder = Callable[[HttpCall], HttpCallResponse | None]
# Bound on the ticks one advance() runs (a module with a 1 ms period and a long advance).
MAX_TICKS_PER_ADVANCE = 10_000
Headers = Iterable[tuple[str, str]] | Mapping[str, str]


def _headers(headers: Headers) -> HeaderList:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k).lower(), str(v)) for k, v in items]


def continues(action: Action, headers: bool) -> bool:
    """Whether Envoy's filter chain goes on after this action. ContinueAndDontEndStream (2) on headers
    continues too (it only matters for a filter that adds a body to a body-less request)."""
    return action is Action.CONTINUE or (headers and action is Action.CONTINUE_AND_END_STREAM)


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


class Plugin:
    """One proxy-wasm module in one VM with one root context, configured like an Envoy PluginConfig.

    `module` is a path to a `.wasm` (or `.wat`) file, or the module's bytes / WAT text.
    `http_responder` answers the module's proxy_http_call callouts when `dispatch_http_calls()` runs;
    return None from it to make the call fail (Envoy: no headers in on_http_call_response).
    """

    def __init__(
        self,
        module: str | Path | bytes,
        *,
        configuration: bytes | str = b"",
        vm_configuration: bytes | str = b"",
        name: str = "",
        root_id: str = "",
        vm_id: str = "",
        properties: Mapping[str, PropertyValue] | None = None,
        environment: Mapping[str, str] | None = None,
        limits: Limits | None = None,
        cache: Path | bool | None = True,
        log_level: LogLevel = LogLevel.TRACE,
        http_responder: HttpResponder | None = None,
        clusters: Iterable[str] | None = None,
        allow_on_headers_stop_iteration: bool | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(module, Path) or (isinstance(module, str) and not module.lstrip().startswith("(")):
            path = Path(module)
            source: bytes | str = read_module_bytes(path)
            module_name = path.name
        else:
            source, module_name = module, name or "module"
        # Envoy's defaults for the rest are in properties.ENVOY_DEFAULTS (what is not configured here).
        base: dict[str, PropertyValue] = {"plugin_name": name, "plugin_root_id": root_id, "plugin_vm_id": vm_id}
        options = InstanceOptions(
            plugin_configuration=_as_bytes(configuration),
            vm_configuration=_as_bytes(vm_configuration),
            properties={**base, **(properties or {})},
            environment=dict(environment or {}),
            limits=limits or Limits(),
            cache=cache_dir() if cache is True else (cache or None),
            log_level=log_level,
            clusters=frozenset(clusters) if clusters is not None else None,
            seed=seed,
            vm_id=vm_id,
        )
        self.name = module_name
        self.http_responder = http_responder
        self._instance = Instance(source, module_name, options)
        # Envoy's PluginConfig field (default false): a headers StopIteration stays StopIteration, so body
        # data still reaches the filter. Unset, it is on only for Higress' 0_2_100 modules, whose gateway
        # runs them that way (their plugins wait in the headers for a body they must see).
        if allow_on_headers_stop_iteration is None:
            allow_on_headers_stop_iteration = self._instance.abi is AbiVersion.V0_2_100
        self.allow_on_headers_stop_iteration = allow_on_headers_stop_iteration
        self._vm_started = False
        self._started = False
        self._tick_clock_ms = 0  # time since the last tick, for advance()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Plugin:
        """What Envoy does when it loads the plugin: start_vm(), then configure()."""
        if not self._vm_started:
            self.start_vm()
        if not self._started:
            self.configure()
        return self

    def start_vm(self) -> Plugin:
        """Run the module's start-up (`_initialize` + `main`, or `_start`), create the root context and
        call on_vm_start with the VM configuration."""
        vm = self._instance
        if vm.has("_initialize"):
            vm.call("_initialize")
            if vm.has("main") and vm.arity("main") == 2:
                vm.call("main", 0, 0)
        elif vm.has("_start"):
            vm.call("_start")
        root = vm.root_context_id
        vm.active_context = root
        vm.call("proxy_on_context_create", root, 0)
        if vm.call("proxy_on_vm_start", root, len(vm.options.vm_configuration)) == 0:
            vm.failed = "proxy_on_vm_start returned false"
            raise WasmCallError(self.name, "proxy_on_vm_start", "the module refused to start (returned false)")
        self._vm_started = True
        return self

    def configure(self, configuration: bytes | str | None = None) -> Plugin:
        """Call on_configure; a new `configuration` replaces the old one, as an Envoy config update does.

        A module answering false raises WasmCallError (Envoy rejects that configuration).
        """
        if not self._vm_started:
            raise WasmStateError(f"{self.name}: call start_vm() before configure()")
        vm = self._instance
        if configuration is not None:
            vm.plugin_configuration = _as_bytes(configuration)
        vm.active_context = vm.root_context_id
        logged = len(vm.logs)
        if vm.call("proxy_on_configure", vm.root_context_id, len(vm.plugin_configuration)) == 0:
            # The module's own complaint is the most useful part of the message.
            said = next((r.message for r in vm.logs[logged:] if r.level >= LogLevel.WARN), "")
            reason = "the module rejected its plugin configuration" + (f": {said}" if said else "")
            raise WasmCallError(self.name, "proxy_on_configure", reason)
        self._started = True
        return self

    def http_context(self) -> HttpContext:
        if not self._started:
            raise WasmStateError(f"{self.name}: call start() before creating HTTP contexts")
        return HttpContext(self)

    # -- observation -----------------------------------------------------------------------------

    @property
    def abi_version(self) -> str:
        return self._instance.abi.value

    @property
    def log_records(self) -> list[LogRecord]:
        return list(self._instance.logs)

    def clear_logs(self) -> None:
        """Forget the log records kept so far (they count against `Limits.host_state_bytes`); for long runs."""
        vm = self._instance
        for record in vm.logs:
            vm.budget.refund(held(record.message))
        vm.logs.clear()

    @property
    def host_state_bytes(self) -> int:
        """Bytes of guest-provided data the host keeps for this VM now (see `Limits.host_state_bytes`)."""
        return self._instance.budget.used

    def logs(self, level: LogLevel | None = None) -> list[str]:
        """Messages logged (proxy_log, or stdout/stderr through WASI), optionally only one level."""
        return [r.message for r in self._instance.logs if level is None or r.level == level]

    @property
    def metrics(self) -> dict[str, int]:
        return {m.name: m.value for m in self._instance.metrics.values()}

    @property
    def histograms(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self._instance.histograms.items()}

    @property
    def shared_data(self) -> dict[bytes, bytes]:
        return {k: v for k, (v, _) in self._instance.shared.data.items()}

    @property
    def tick_period_ms(self) -> int:
        return self._instance.tick_period_ms

    @property
    def http_calls(self) -> list[HttpCall]:
        """Callouts the module made that nobody answered yet."""
        return list(self._instance.http_calls.values())

    @property
    def failed(self) -> str | None:
        """Why the VM is unusable (a trap or a limit), as Envoy would fail it; None while healthy."""
        return self._instance.failed

    # -- driving the root context ---------------------------------------------------------------

    def tick(self) -> None:
        vm = self._instance
        vm.active_context = vm.root_context_id
        vm.call("proxy_on_tick", vm.root_context_id)

    def advance(self, milliseconds: int) -> int:
        """Let time pass as Envoy's timer sees it: on_tick runs once per tick period that elapses (the
        module's proxy_set_tick_period_milliseconds; a period the module changes in on_tick applies from the
        next tick). Returns the ticks run. Envoy ticks on its own; a test calls this where time would pass."""
        if milliseconds < 0:
            raise WasmStateError(f"{self.name}: advance({milliseconds}): time does not go backwards")
        period = self.tick_period_ms
        if period == 0:
            self._tick_clock_ms = 0
            return 0
        due = (self._tick_clock_ms + milliseconds) // period
        if due > MAX_TICKS_PER_ADVANCE:
            raise WasmStateError(
                f"{self.name}: advance({milliseconds}) would run {due} ticks of {period} ms; at most "
                f"{MAX_TICKS_PER_ADVANCE} run per call: advance in smaller steps"
            )
        self._tick_clock_ms += milliseconds
        ticks = 0
        while self.tick_period_ms and self._tick_clock_ms >= self.tick_period_ms and ticks < MAX_TICKS_PER_ADVANCE:
            self._tick_clock_ms -= self.tick_period_ms
            self.tick()
            ticks += 1
        if not self.tick_period_ms:
            self._tick_clock_ms = 0
        return ticks

    def respond_http_call(self, call: HttpCall | int, response: HttpCallResponse | None) -> None:
        """Deliver the answer to a callout; None delivers a failure (reset / timeout)."""
        vm = self._instance
        token = call if isinstance(call, int) else call.token
        pending = vm.http_calls.pop(token, None)
        if pending is None:
            raise WasmStateError(f"{self.name}: no pending http call with token {token}")
        vm.budget.release(callout_scope(token))
        vm.call_response = response or HttpCallResponse([])
        # Envoy reports OK for any response (its own 503/504 replies included) and a broken connection
        # for a reset.
        vm.status = (Status.BROKEN_CONNECTION, b"reset") if response is None else (Status.OK, b"")
        vm.active_context = pending.context_id
        try:
            if response is None:
                vm.call("proxy_on_http_call_response", pending.context_id, token, 0, 0, 0)
            else:
                vm.call(
                    "proxy_on_http_call_response",
                    pending.context_id,
                    token,
                    len(response.headers),
                    len(response.body),
                    len(response.trailers),
                )
        finally:
            vm.call_response = None
            vm.budget.release(CALL_RESPONSE_SCOPE)

    def dispatch_http_calls(self) -> int:
        """Answer every pending callout with `http_responder`; returns how many were answered."""
        if self.http_responder is None:
            return 0
        answered = 0
        # Only the calls pending now: a module that makes a new callout in every response callback would
        # otherwise keep this loop going forever; the caller's rounds (exchange.wait) bound those.
        for token in list(self._instance.http_calls):
            call = self._instance.http_calls.get(token)
            if call is None or self._instance.failed is not None:
                continue
            self.respond_http_call(call, self.http_responder(call))
            answered += 1
        return answered

    # -- used by HttpContext ---------------------------------------------------------------------

    @property
    def instance(self) -> Instance:
        return self._instance


class HttpContext:
    """One HTTP stream through the filter. Phases return the module's action (after Envoy's overrides)."""

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        vm = plugin.instance
        self.context_id = vm.new_context_id()
        self._state = vm.streams[self.context_id] = StreamState(self.context_id, started_ns=time.time_ns())
        self._enter()
        vm.call("proxy_on_context_create", self.context_id, vm.root_context_id)

    def _enter(self) -> Instance:
        if self._state.done:
            raise WasmStateError(f"{self.plugin.name}: HTTP context {self.context_id} is already finished")
        vm = self.plugin.instance
        vm.active_context = self.context_id
        return vm

    def _action(self, raw: int | None, headers: bool, held_map: MapType | None = None) -> Action:
        value = 0 if raw is None else raw & 0xFFFFFFFF
        if self._state.local_response is not None:
            action = Action.PAUSE  # Envoy stops iteration once a local reply is sent
        elif headers and value == Action.PAUSE and not self.plugin.allow_on_headers_stop_iteration:
            # Envoy turns StopIteration on headers into StopAllIterationAndWatermark (cpp-host issue #143).
            action = Action.STOP_ALL_ITERATION_AND_WATERMARK
        else:
            action = Action(min(value, Action.STOP_ALL_ITERATION_AND_WATERMARK))
        if held_map is not None and continues(action, headers):
            self._state.held_maps.discard(held_map)  # Envoy lets go of a map its callback continued
        return action

    def _headers_call(self, export: str, count: int, end_of_stream: bool) -> int | None:
        vm = self._enter()
        if vm.has(export) and vm.arity(export) == 2:  # ABI 0.1.0: no end_of_stream
            return vm.call(export, self.context_id, count)
        return vm.call(export, self.context_id, count, int(end_of_stream))

    def on_request_headers(self, headers: Headers, end_of_stream: bool = False) -> Action:
        self._state.request_headers[:] = _headers(headers)
        self._state.request_end = end_of_stream
        self._state.held_maps.add(MapType.HTTP_REQUEST_HEADERS)
        raw = self._headers_call("proxy_on_request_headers", len(self._state.request_headers), end_of_stream)
        return self._action(raw, True, MapType.HTTP_REQUEST_HEADERS)

    def on_response_headers(self, headers: Headers, end_of_stream: bool = False) -> Action:
        self._state.response_headers[:] = _headers(headers)
        self._state.response_end = end_of_stream
        status = next((v for k, v in self._state.response_headers if k == ":status"), "")
        self._state.response_code = int(status) if status.isdigit() else None
        self._state.held_maps.add(MapType.HTTP_RESPONSE_HEADERS)
        raw = self._headers_call("proxy_on_response_headers", len(self._state.response_headers), end_of_stream)
        return self._action(raw, True, MapType.HTTP_RESPONSE_HEADERS)

    def on_request_body(self, chunk: bytes, end_of_stream: bool = True) -> Action:
        """Envoy's decodeData: the module sees everything it held back so far plus this chunk."""
        s = self._state
        s.request_buffer.extend(chunk)
        s.request_bytes += len(chunk)
        s.request_end = end_of_stream
        vm = self._enter()
        action = self._action(
            vm.call("proxy_on_request_body", self.context_id, len(s.request_buffer), int(end_of_stream)),
            headers=False,
        )
        if action is Action.CONTINUE:
            self.release_request_body()
        return action

    def on_response_body(self, chunk: bytes, end_of_stream: bool = True) -> Action:
        s = self._state
        s.response_buffer.extend(chunk)
        s.response_end = end_of_stream
        vm = self._enter()
        action = self._action(
            vm.call("proxy_on_response_body", self.context_id, len(s.response_buffer), int(end_of_stream)),
            headers=False,
        )
        if action is Action.CONTINUE:
            self.release_response_body()
        return action

    def on_request_trailers(self, trailers: Headers) -> Action:
        self._state.request_trailers[:] = _headers(trailers)
        self._state.held_maps.add(MapType.HTTP_REQUEST_TRAILERS)
        vm = self._enter()
        raw = vm.call("proxy_on_request_trailers", self.context_id, len(self._state.request_trailers))
        return self._action(raw, False, MapType.HTTP_REQUEST_TRAILERS)

    def on_response_trailers(self, trailers: Headers) -> Action:
        self._state.response_trailers[:] = _headers(trailers)
        self._state.held_maps.add(MapType.HTTP_RESPONSE_TRAILERS)
        vm = self._enter()
        raw = vm.call("proxy_on_response_trailers", self.context_id, len(self._state.response_trailers))
        return self._action(raw, False, MapType.HTTP_RESPONSE_TRAILERS)

    def finish(self) -> None:
        """End of stream as Envoy ends it: on_done, on_log, on_delete (with every map readable, as the
        access log sees them, and only the maps still held changeable)."""
        if self._state.done:
            return
        self._state.logging = True
        vm = self._enter()
        vm.call("proxy_on_done", self.context_id)
        vm.call("proxy_on_log", self.context_id)
        vm.call("proxy_on_delete", self.context_id)
        self._state.done = True
        vm.streams.pop(self.context_id, None)
        vm.budget.release(self.context_id)

    # -- what the filter did ---------------------------------------------------------------------

    def release_request_body(self) -> None:
        """Forward what the module buffered (Envoy does this when it continues the stream)."""
        self._state.request_sent.extend(self._state.request_buffer)
        self._state.request_buffer.clear()

    def release_response_body(self) -> None:
        self._state.response_bytes += len(self._state.response_buffer)
        self._state.response_sent.extend(self._state.response_buffer)
        self._state.response_buffer.clear()

    def set_upstream(self, address: str | None, details: str) -> None:
        """What Envoy's router knows once it has an answer (the upstream.* and response.* properties):
        the upstream's address (None for a reply Envoy or the filter made) and the response code details."""
        self._state.upstream_address = address
        self._state.upstream_attempts = 1 if address is not None else self._state.upstream_attempts
        self._state.response_details = details

    def set_response(self, status: int, details: str, headers: HeaderList) -> None:
        """A local reply replaced the response without passing this filter: Envoy writes it into the same
        response header map (what on_log reads) and the response.code / code_details properties."""
        self._state.response_code = status
        self._state.response_details = details
        self._state.response_headers[:] = [(":status", str(status)), *headers]

    @property
    def request_body_sent(self) -> bytes:
        """The part of the request body that went on to the upstream."""
        return bytes(self._state.request_sent)

    @property
    def response_body_sent(self) -> bytes:
        """The part of the response body that went on to the client."""
        return bytes(self._state.response_sent)

    def take_local_response(self) -> LocalResponse | None:
        """Hand the local reply over to Envoy's encoder path, which runs the response callbacks on it."""
        local, self._state.local_response = self._state.local_response, None
        return local

    def take_continue_request(self) -> bool:
        """True once after the module called proxy_continue_stream(HTTP_REQUEST)."""
        flag, self._state.continue_request = self._state.continue_request, False
        return flag

    def take_continue_response(self) -> bool:
        flag, self._state.continue_response = self._state.continue_response, False
        return flag

    @property
    def request_headers(self) -> HeaderList:
        return list(self._state.request_headers)

    @property
    def response_headers(self) -> HeaderList:
        return list(self._state.response_headers)

    @property
    def request_trailers(self) -> HeaderList:
        return list(self._state.request_trailers)

    @property
    def response_trailers(self) -> HeaderList:
        return list(self._state.response_trailers)

    @property
    def request_body(self) -> bytes:
        return bytes(self._state.request_sent + self._state.request_buffer)

    @property
    def response_body(self) -> bytes:
        return bytes(self._state.response_sent + self._state.response_buffer)

    @property
    def request_body_held(self) -> bytes:
        """The part of the request body the module is holding back (buffered, not yet forwarded)."""
        return bytes(self._state.request_buffer)

    @property
    def response_body_held(self) -> bytes:
        return bytes(self._state.response_buffer)

    @property
    def local_response(self) -> LocalResponse | None:
        return self._state.local_response

    @property
    def closed(self) -> bool:
        """The module called proxy_close_stream (Envoy resets the stream)."""
        return self._state.closed
