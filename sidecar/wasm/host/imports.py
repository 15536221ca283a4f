"""The `env.proxy_*` host functions, with Envoy's return codes.

Each function gets the wasmtime Caller first (used as the store for memory access and for calling
the guest allocator re-entrantly) and returns a proxy_status_t. Its Wasm signature (after the Caller)
is on its `@host_function`; binding.link() links the ones a module imports.

Whatever a function copies from the guest into host state is charged to the VM's budget
(`state.budget`, Limits.host_state_bytes) before it is kept, and refunded when it is replaced or
dropped. Sizes the guest announces are checked against the budget before its memory is copied, so a
refused call costs the host nothing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from typing import Any

from sidecar.wasm.host.abi import (
    BufferType,
    LogLevel,
    MapType,
    MetricType,
    Status,
    StreamType,
    decode_pairs,
    encode_pairs,
)
from sidecar.wasm.host.binding import I32, I64, HostState, host_function
from sidecar.wasm.host.foreign import call_foreign
from sidecar.wasm.host.state import ENTRY_BYTES, HeaderList, HttpCall, LocalResponse, Metric, held, held_pairs

__all__ = ["CALL_RESPONSE_SCOPE", "Env", "callout_scope"]

Caller = Any

# Budget scope of what the guest adds to a callout's response maps: refunded once the callback returns.
CALL_RESPONSE_SCOPE = "http-call-response"
# Bytes one histogram sample costs the host (a list slot and an int object).
_SAMPLE_BYTES = 48


# gRPC metadata maps: this host makes no gRPC calls, so they never exist.
_GRPC_MAPS = (MapType.GRPC_CALL_INITIAL_METADATA, MapType.GRPC_CALL_TRAILING_METADATA)


def callout_scope(token: int) -> tuple[str, int]:
    """Budget scope of a pending proxy_http_call: refunded when the call is answered."""
    return ("http-call", token)


def _to_list(pairs: list[tuple[bytes, bytes]]) -> HeaderList:
    return [(k.decode(errors="surrogateescape"), v.decode(errors="surrogateescape")) for k, v in pairs]


def _to_bytes(headers: HeaderList) -> list[tuple[bytes, bytes]]:
    return [(k.encode(errors="surrogateescape"), v.encode(errors="surrogateescape")) for k, v in headers]


def _text(data: bytes) -> str:
    return data.decode(errors="surrogateescape")


class Env:
    """The `env` host functions, bound to one instance's state."""

    def __init__(self, state: HostState) -> None:
        self.state = state

    # -- helpers ----------------------------------------------------------------------------------

    def _read(self, caller: Caller, ptr: int, size: int) -> bytes | None:
        return self.state.memory.read(caller, ptr, size)

    def _map(self, map_type: int, *, reading: bool = False) -> HeaderList | None:
        found = self._map_and_scope(map_type, reading=reading)
        return None if found is None else found[0]

    def _map_and_scope(self, map_type: int, *, reading: bool = False) -> tuple[HeaderList, Hashable] | None:
        """The header map and the budget scope its growth is charged to; None if the module cannot use it
        now (`reading`: get a value or the pairs, which on_log may do on every map)."""
        state = self.state
        if map_type in (MapType.HTTP_CALL_RESPONSE_HEADERS, MapType.HTTP_CALL_RESPONSE_TRAILERS):
            if state.call_response is None:
                return None
            if map_type == MapType.HTTP_CALL_RESPONSE_HEADERS:
                return state.call_response.headers, CALL_RESPONSE_SCOPE
            return state.call_response.trailers, CALL_RESPONSE_SCOPE
        stream = state.stream()
        if stream is None or not (stream.readable(map_type) if reading else map_type in stream.held_maps):
            return None
        maps: dict[int, HeaderList] = {
            MapType.HTTP_REQUEST_HEADERS: stream.request_headers,
            MapType.HTTP_REQUEST_TRAILERS: stream.request_trailers,
            MapType.HTTP_RESPONSE_HEADERS: stream.response_headers,
            MapType.HTTP_RESPONSE_TRAILERS: stream.response_trailers,
        }
        headers = maps.get(map_type)
        return None if headers is None else (headers, stream.context_id)

    def _check(self, size: int, what: str) -> None:
        """Refuse before copying guest memory when the guest's data alone cannot fit the budget."""
        self.state.budget.check(size & 0xFFFFFFFF, what)

    def _buffer(self, buffer_type: int) -> tuple[bytes, bool] | None:
        """The buffer's bytes and its end-of-stream flag."""
        state = self.state
        # Envoy hands the configurations over only in the callbacks they are meant for.
        if buffer_type == BufferType.PLUGIN_CONFIGURATION:
            configuring = state.current_callback == "proxy_on_configure"
            return (state.plugin_configuration, True) if configuring else None
        if buffer_type == BufferType.VM_CONFIGURATION:
            starting = state.current_callback == "proxy_on_vm_start"
            return (state.vm_configuration if starting else b"", True)
        if buffer_type == BufferType.HTTP_CALL_RESPONSE_BODY:
            return (state.call_response.body, True) if state.call_response is not None else None
        stream = state.stream()
        if stream is None:
            return None
        if buffer_type == BufferType.HTTP_REQUEST_BODY:
            return bytes(stream.request_buffer), stream.request_end
        if buffer_type == BufferType.HTTP_RESPONSE_BODY:
            return bytes(stream.response_buffer), stream.response_end
        return None

    # -- logging, time, lifecycle ---------------------------------------------------------------

    @host_function(params=(I32, I32, I32), results=(I32,))
    def proxy_log(self, caller: Caller, level: int, ptr: int, size: int) -> int:
        kept = 0 <= level <= LogLevel.CRITICAL and level >= self.state.log_level
        if kept:
            self._check(size, f"proxy_log of {size & 0xFFFFFFFF} bytes")
        message = self._read(caller, ptr, size)
        if message is None:
            return Status.INVALID_MEMORY_ACCESS
        if not 0 <= level <= LogLevel.CRITICAL:
            return Status.BAD_ARGUMENT
        if kept:
            self.state.log(LogLevel(level), _text(message))
        return Status.OK

    @host_function(params=(I32,), results=(I32,))
    def proxy_get_log_level(self, caller: Caller, ret: int) -> int:
        return (
            Status.OK if self.state.memory.put_u32(caller, ret, self.state.log_level) else Status.INVALID_MEMORY_ACCESS
        )

    @host_function(params=(I32,), results=(I32,))
    def proxy_get_current_time_nanoseconds(self, caller: Caller, ret: int) -> int:
        return Status.OK if self.state.memory.put_u64(caller, ret, time.time_ns()) else Status.INVALID_MEMORY_ACCESS

    @host_function(params=(I32,), results=(I32,))
    def proxy_set_tick_period_milliseconds(self, caller: Caller, period: int) -> int:
        self.state.tick_period_ms = period & 0xFFFFFFFF
        return Status.OK

    @host_function(params=(I32,), results=(I32,))
    def proxy_set_effective_context(self, caller: Caller, context_id: int) -> int:
        state = self.state
        if context_id != state.root_context_id and context_id not in state.streams:
            return Status.BAD_ARGUMENT
        state.active_context = context_id
        return Status.OK

    @host_function(results=(I32,))
    def proxy_done(self, caller: Caller) -> int:
        return Status.OK

    @host_function(params=(I32, I32, I32), results=(I32,))
    def proxy_get_status(self, caller: Caller, code_ptr: int, msg_ptr_ptr: int, msg_size_ptr: int) -> int:
        code, message = self.state.status
        if not self.state.memory.put_u32(caller, code_ptr, code):
            return Status.INVALID_MEMORY_ACCESS
        return self.state.memory.give(caller, message, msg_ptr_ptr, msg_size_ptr)

    # -- buffers --------------------------------------------------------------------------------

    @host_function(params=(I32, I32, I32, I32, I32), results=(I32,))
    def proxy_get_buffer_bytes(self, caller: Caller, btype: int, start: int, length: int, pp: int, sp: int) -> int:
        buffer = self._buffer(btype)
        if buffer is None:
            return Status.NOT_FOUND
        data = buffer[0]
        start, length = start & 0xFFFFFFFF, length & 0xFFFFFFFF
        return self.state.memory.give(caller, data[start : start + length], pp, sp)

    @host_function(params=(I32, I32, I32), results=(I32,))
    def proxy_get_buffer_status(self, caller: Caller, btype: int, size_ptr: int, flags_ptr: int) -> int:
        buffer = self._buffer(btype)
        if buffer is None:
            return Status.NOT_FOUND if btype in tuple(BufferType) else Status.BAD_ARGUMENT
        mem = self.state.memory
        # Envoy writes no flags (0), whatever the end-of-stream state (checked against Envoy 1.40).
        if not (mem.put_u32(caller, size_ptr, len(buffer[0])) and mem.put_u32(caller, flags_ptr, 0)):
            return Status.INVALID_MEMORY_ACCESS
        return Status.OK

    @host_function(params=(I32, I32, I32, I32, I32), results=(I32,))
    def proxy_set_buffer_bytes(self, caller: Caller, btype: int, start: int, length: int, ptr: int, size: int) -> int:
        self._check(size, f"proxy_set_buffer_bytes of {size & 0xFFFFFFFF} bytes")
        data = self._read(caller, ptr, size)
        if data is None:
            return Status.INVALID_MEMORY_ACCESS
        stream = self.state.stream()
        if stream is None or btype not in (BufferType.HTTP_REQUEST_BODY, BufferType.HTTP_RESPONSE_BODY):
            return Status.NOT_FOUND
        buf = stream.request_buffer if btype == BufferType.HTTP_REQUEST_BODY else stream.response_buffer
        start, length = start & 0xFFFFFFFF, length & 0xFFFFFFFF
        # Envoy's body buffers only support replacing from the front and appending.
        if start == 0:
            growth = len(data) - min(length, len(buf))
        elif start >= len(buf):
            growth = len(data)
        else:
            return Status.BAD_ARGUMENT
        self.state.budget.charge(growth, f"proxy_set_buffer_bytes growing a body by {growth} bytes", stream.context_id)
        if start == 0:
            del buf[: min(length, len(buf))]
            buf[0:0] = data
        else:
            buf.extend(data)
        return Status.OK

    @host_function(params=(I32, I32), results=(I32,))
    def proxy_get_configuration(self, caller: Caller, pp: int, sp: int) -> int:
        # ABI 0.1.0's only configuration call: the plugin's, whenever asked.
        return self.state.memory.give(caller, self.state.plugin_configuration, pp, sp)

    # -- header maps ----------------------------------------------------------------------------

    @host_function(params=(I32, I32), results=(I32,))
    def proxy_get_header_map_size(self, caller: Caller, map_type: int, ret: int) -> int:
        headers = self._map(map_type)
        if headers is None:
            return Status.BAD_ARGUMENT
        size = sum(len(k.encode()) + len(v.encode()) for k, v in headers)
        return Status.OK if self.state.memory.put_u32(caller, ret, size) else Status.INVALID_MEMORY_ACCESS

    @host_function(params=(I32, I32, I32), results=(I32,))
    def proxy_get_header_map_pairs(self, caller: Caller, map_type: int, pp: int, sp: int) -> int:
        headers = self._map(map_type, reading=True)
        if headers is None:
            # A map Envoy does not hold (now) reads as empty; only an unknown map type is an error.
            known = map_type in tuple(MapType) and map_type not in _GRPC_MAPS
            return self.state.memory.give(caller, b"", pp, sp) if known else Status.BAD_ARGUMENT
        return self.state.memory.give(caller, encode_pairs(_to_bytes(headers)), pp, sp)

    @host_function(params=(I32, I32, I32), results=(I32,))
    def proxy_set_header_map_pairs(self, caller: Caller, map_type: int, ptr: int, size: int) -> int:
        found = self._map_and_scope(map_type)
        self._check(size, f"proxy_set_header_map_pairs of {size & 0xFFFFFFFF} bytes")
        data = self._read(caller, ptr, size)
        if data is None:
            return Status.INVALID_MEMORY_ACCESS
        if found is None:
            return Status.BAD_ARGUMENT
        pairs = decode_pairs(data)
        if pairs is None:
            return Status.BAD_ARGUMENT
        headers, scope = found
        new = [(k.lower(), v) for k, v in _to_list(pairs)]
        growth = held_pairs(new) - held_pairs(headers)
        self.state.budget.charge(growth, f"proxy_set_header_map_pairs of {len(new)} headers", scope)
        headers[:] = new
        return Status.OK

    def _key_value(self, caller: Caller, kp: int, ks: int, vp: int = 0, vs: int = 0) -> tuple[str, str] | None:
        key = self._read(caller, kp, ks)
        value = self._read(caller, vp, vs)
        if key is None or value is None:
            return None
        return _text(key).lower(), _text(value)

    @host_function(params=(I32, I32, I32, I32, I32), results=(I32,))
    def proxy_get_header_map_value(self, caller: Caller, map_type: int, kp: int, ks: int, pp: int, sp: int) -> int:
        kv = self._key_value(caller, kp, ks)
        if kv is None:
            return Status.INVALID_MEMORY_ACCESS
        headers = self._map(map_type, reading=True)
        if headers is None:
            return Status.BAD_ARGUMENT
        values = [v for k, v in headers if k == kv[0]]
        if not values:
            # ABI 0.1.0 hosts answered OK with an empty value; NOT_FOUND since 0.2.0.
            if self.state.abi.legacy:
                return self.state.memory.give(caller, b"", pp, sp)
            return Status.NOT_FOUND
        # Envoy answers with the first of repeated headers (checked against Envoy 1.40).
        return self.state.memory.give(caller, values[0].encode(errors="surrogateescape"), pp, sp)

    @host_function(params=(I32, I32, I32, I32, I32), results=(I32,))
    def proxy_add_header_map_value(self, caller: Caller, map_type: int, kp: int, ks: int, vp: int, vs: int) -> int:
        self._check((ks & 0xFFFFFFFF) + (vs & 0xFFFFFFFF), "proxy_add_header_map_value")
        kv = self._key_value(caller, kp, ks, vp, vs)
        if kv is None:
            return Status.INVALID_MEMORY_ACCESS
        found = self._map_and_scope(map_type)
        if found is None:
            return Status.BAD_ARGUMENT
        headers, scope = found
        self.state.budget.charge(held(*kv), f"proxy_add_header_map_value of {kv[0]!r}", scope)
        headers.append(kv)
        return Status.OK

    @host_function(params=(I32, I32, I32, I32, I32), results=(I32,))
    def proxy_replace_header_map_value(self, caller: Caller, map_type: int, kp: int, ks: int, vp: int, vs: int) -> int:
        self._check((ks & 0xFFFFFFFF) + (vs & 0xFFFFFFFF), "proxy_replace_header_map_value")
        kv = self._key_value(caller, kp, ks, vp, vs)
        if kv is None:
            return Status.INVALID_MEMORY_ACCESS
        found = self._map_and_scope(map_type)
        if found is None:
            return Status.BAD_ARGUMENT
        headers, scope = found
        growth = held(*kv) - held_pairs(h for h in headers if h[0] == kv[0])
        self.state.budget.charge(growth, f"proxy_replace_header_map_value of {kv[0]!r}", scope)
        index = next((i for i, (k, _) in enumerate(headers) if k == kv[0]), None)
        if index is None:
            headers.append(kv)
        else:
            headers[:] = [h for i, h in enumerate(headers) if h[0] != kv[0] or i == index]
            headers[index] = kv
        return Status.OK

    @host_function(params=(I32, I32, I32), results=(I32,))
    def proxy_remove_header_map_value(self, caller: Caller, map_type: int, kp: int, ks: int) -> int:
        kv = self._key_value(caller, kp, ks)
        if kv is None:
            return Status.INVALID_MEMORY_ACCESS
        found = self._map_and_scope(map_type)
        if found is None:
            return Status.BAD_ARGUMENT
        headers, scope = found
        self.state.budget.refund(held_pairs(h for h in headers if h[0] == kv[0]), scope)
        headers[:] = [h for h in headers if h[0] != kv[0]]
        return Status.OK

    # -- stream control -------------------------------------------------------------------------

    @host_function(params=(I32,), results=(I32,))
    def proxy_continue_stream(self, caller: Caller, stream_type: int) -> int:
        stream = self.state.stream()
        if stream is None:
            return Status.NOT_FOUND
        if stream_type == StreamType.HTTP_REQUEST:
            stream.continue_request = True
        elif stream_type == StreamType.HTTP_RESPONSE:
            stream.continue_response = True
        else:
            return Status.BAD_ARGUMENT
        return Status.OK

    @host_function(params=(I32,), results=(I32,))
    def proxy_close_stream(self, caller: Caller, stream_type: int) -> int:
        stream = self.state.stream()
        if stream is None:
            return Status.NOT_FOUND
        if stream_type not in (StreamType.HTTP_REQUEST, StreamType.HTTP_RESPONSE):
            return Status.BAD_ARGUMENT
        stream.closed = True
        return Status.OK

    @host_function(results=(I32,))
    def proxy_continue_request(self, caller: Caller) -> int:
        return self.proxy_continue_stream(caller, StreamType.HTTP_REQUEST)

    @host_function(results=(I32,))
    def proxy_continue_response(self, caller: Caller) -> int:
        return self.proxy_continue_stream(caller, StreamType.HTTP_RESPONSE)

    @host_function(results=(I32,))
    def proxy_clear_route_cache(self, caller: Caller) -> int:
        return Status.OK

    @host_function(params=(I32, I32, I32, I32, I32, I32, I32, I32), results=(I32,))
    def proxy_send_local_response(
        self, caller: Caller, status: int, dp: int, ds: int, bp: int, bs: int, hp: int, hs: int, grpc: int
    ) -> int:
        self._check((ds & 0xFFFFFFFF) + (bs & 0xFFFFFFFF) + (hs & 0xFFFFFFFF), "proxy_send_local_response")
        details, body, raw_headers = (
            self._read(caller, dp, ds),
            self._read(caller, bp, bs),
            self._read(caller, hp, hs),
        )
        if details is None or body is None or raw_headers is None:
            return Status.INVALID_MEMORY_ACCESS
        pairs = decode_pairs(raw_headers)
        if pairs is None:
            return Status.BAD_ARGUMENT
        stream = self.state.stream()
        if stream is None:
            return Status.NOT_FOUND
        grpc_status = None if grpc < 0 or grpc > 0xFFFF else grpc
        headers = [(k.lower(), v) for k, v in _to_list(pairs)]
        reply = LocalResponse(status, headers, body, _text(details), grpc_status)
        budget = self.state.budget
        if stream.local_response is not None:
            budget.refund(_held_reply(stream.local_response), stream.context_id)
        budget.charge(_held_reply(reply), f"proxy_send_local_response with a {len(body)}-byte body", stream.context_id)
        stream.local_response = reply
        return Status.OK

    # -- properties -----------------------------------------------------------------------------

    @host_function(params=(I32, I32, I32, I32), results=(I32,))
    def proxy_get_property(self, caller: Caller, path_ptr: int, path_size: int, pp: int, sp: int) -> int:
        path = self._read(caller, path_ptr, path_size)
        if path is None:
            return Status.INVALID_MEMORY_ACCESS
        state = self.state
        value = state.properties.get(path, state.stream())
        if isinstance(value, Status):
            return value
        return state.memory.give(caller, value, pp, sp)

    @host_function(params=(I32, I32, I32, I32), results=(I32,))
    def proxy_set_property(self, caller: Caller, path_ptr: int, path_size: int, vp: int, vs: int) -> int:
        self._check((path_size & 0xFFFFFFFF) + (vs & 0xFFFFFFFF), "proxy_set_property")
        path, value = self._read(caller, path_ptr, path_size), self._read(caller, vp, vs)
        if path is None or value is None:
            return Status.INVALID_MEMORY_ACCESS
        properties = self.state.properties
        old = properties.module_value(path)
        growth = held(path, value) - (0 if old is None else held(path, old))
        self.state.budget.charge(growth, f"proxy_set_property of a {len(value)}-byte value")
        properties.set(path, value)
        return Status.OK

    # -- metrics ---------------------------------------------------------------------------------

    @host_function(params=(I32, I32, I32, I32), results=(I32,))
    def proxy_define_metric(self, caller: Caller, mtype: int, np: int, ns: int, ret: int) -> int:
        self._check(ns, f"proxy_define_metric with a {ns & 0xFFFFFFFF}-byte name")
        name = self._read(caller, np, ns)
        if name is None:
            return Status.INVALID_MEMORY_ACCESS
        if mtype not in tuple(MetricType):
            return Status.BAD_ARGUMENT
        state = self.state
        key = (mtype, _text(name))
        # Every definition gets a new id, as in Envoy; a name defined again names the same metric.
        metric_id = (len(state.metrics) + 1) << 2 | mtype
        first = state.metric_ids.get(key)
        if first is None:
            # The name, a Metric record, its key tuple and two dict entries.
            state.budget.charge(held(key[1]) + 3 * ENTRY_BYTES, f"proxy_define_metric of {key[1]!r}")
            state.metric_ids[key] = metric_id
            state.metrics[metric_id] = Metric(metric_id, MetricType(mtype), key[1])
        else:
            state.budget.charge(ENTRY_BYTES, f"proxy_define_metric of {key[1]!r} again")
            state.metrics[metric_id] = state.metrics[first]
        return Status.OK if state.memory.put_u32(caller, ret, metric_id) else Status.INVALID_MEMORY_ACCESS

    @host_function(params=(I32, I64), results=(I32,))
    def proxy_increment_metric(self, caller: Caller, metric_id: int, delta: int) -> int:
        # Envoy reads the metric's type from the id's low bits before looking it up: a histogram id (known or
        # not) cannot be incremented, an unknown counter or gauge id is NOT_FOUND.
        if _id_type(metric_id) not in (MetricType.COUNTER, MetricType.GAUGE):
            return Status.BAD_ARGUMENT
        metric = self.state.metrics.get(metric_id & 0xFFFFFFFF)
        if metric is None:
            return Status.NOT_FOUND
        if metric.type == MetricType.COUNTER and delta <= 0:  # Envoy refuses 0 too
            return Status.BAD_ARGUMENT
        metric.value += delta
        return Status.OK

    @host_function(params=(I32, I64), results=(I32,))
    def proxy_record_metric(self, caller: Caller, metric_id: int, value: int) -> int:
        metric = self.state.metrics.get(metric_id & 0xFFFFFFFF)
        if metric is None:  # whatever type the id's bits name
            return Status.NOT_FOUND
        value &= 0xFFFFFFFFFFFFFFFF
        if metric.type == MetricType.COUNTER:
            metric.value += value
        elif metric.type == MetricType.GAUGE:
            metric.value = value
        else:
            self.state.budget.charge(_SAMPLE_BYTES, f"proxy_record_metric of a sample of {metric.name!r}")
            self.state.histograms.setdefault(metric.name, []).append(value)
            metric.value = value
        return Status.OK

    @host_function(params=(I32, I32), results=(I32,))
    def proxy_get_metric(self, caller: Caller, metric_id: int, ret: int) -> int:
        if _id_type(metric_id) not in (MetricType.COUNTER, MetricType.GAUGE):
            return Status.BAD_ARGUMENT  # histograms have no single value
        metric = self.state.metrics.get(metric_id & 0xFFFFFFFF)
        if metric is None:
            return Status.NOT_FOUND
        return Status.OK if self.state.memory.put_u64(caller, ret, metric.value) else Status.INVALID_MEMORY_ACCESS

    # -- shared data and queues -------------------------------------------------------------------

    @host_function(params=(I32, I32, I32, I32, I32), results=(I32,))
    def proxy_get_shared_data(self, caller: Caller, kp: int, ks: int, pp: int, sp: int, cas_ptr: int) -> int:
        key = self._read(caller, kp, ks)
        if key is None:
            return Status.INVALID_MEMORY_ACCESS
        entry = self.state.shared.data.get(key)
        if entry is None:
            return Status.NOT_FOUND
        if not self.state.memory.put_u32(caller, cas_ptr, entry[1]):
            return Status.INVALID_MEMORY_ACCESS
        return self.state.memory.give(caller, entry[0], pp, sp)

    @host_function(params=(I32, I32, I32, I32, I32), results=(I32,))
    def proxy_set_shared_data(self, caller: Caller, kp: int, ks: int, vp: int, vs: int, cas: int) -> int:
        self._check((ks & 0xFFFFFFFF) + (vs & 0xFFFFFFFF), f"proxy_set_shared_data of {vs & 0xFFFFFFFF} bytes")
        key, value = self._read(caller, kp, ks), self._read(caller, vp, vs)
        if key is None or value is None:
            return Status.INVALID_MEMORY_ACCESS
        current = self.state.shared.data.get(key)
        cas &= 0xFFFFFFFF
        if cas and current is not None and current[1] != cas:
            return Status.CAS_MISMATCH
        # A new entry holds its key, value and a (value, cas) tuple; a replaced one only swaps the value.
        growth = held(key, value) + ENTRY_BYTES if current is None else held(value) - held(current[0])
        self.state.budget.charge(growth, f"proxy_set_shared_data of {len(value)} bytes")
        self.state.shared.data[key] = (value, self.state.shared.take_cas())
        return Status.OK

    @host_function(params=(I32, I32, I32), results=(I32,))
    def proxy_register_shared_queue(self, caller: Caller, np: int, ns: int, ret: int) -> int:
        self._check(ns, f"proxy_register_shared_queue with a {ns & 0xFFFFFFFF}-byte name")
        name = self._read(caller, np, ns)
        if name is None:
            return Status.INVALID_MEMORY_ACCESS
        shared = self.state.shared
        queue_id = shared.queue_ids.get(name)
        if queue_id is None:
            self.state.budget.charge(held(name, deque()) + 2 * ENTRY_BYTES, "proxy_register_shared_queue")
            queue_id = shared.queue_ids[name] = len(shared.queue_ids) + 1
            shared.queues[queue_id] = (name, self.state.root_context_id, deque())
        return Status.OK if self.state.memory.put_u32(caller, ret, queue_id) else Status.INVALID_MEMORY_ACCESS

    @host_function(params=(I32, I32, I32, I32, I32), results=(I32,))
    def proxy_resolve_shared_queue(self, caller: Caller, vp: int, vs: int, np: int, ns: int, ret: int) -> int:
        vm_id, name = self._read(caller, vp, vs), self._read(caller, np, ns)
        if vm_id is None or name is None:
            return Status.INVALID_MEMORY_ACCESS
        # Queues belong to a VM id; "" names the caller's own (this host runs one VM).
        if vm_id and _text(vm_id) != self.state.vm_id:
            return Status.NOT_FOUND
        queue_id = self.state.shared.queue_ids.get(name)
        if queue_id is None:
            return Status.NOT_FOUND
        return Status.OK if self.state.memory.put_u32(caller, ret, queue_id) else Status.INVALID_MEMORY_ACCESS

    @host_function(params=(I32, I32, I32), results=(I32,))
    def proxy_enqueue_shared_queue(self, caller: Caller, queue_id: int, vp: int, vs: int) -> int:
        self._check(vs, f"proxy_enqueue_shared_queue of {vs & 0xFFFFFFFF} bytes")
        value = self._read(caller, vp, vs)
        if value is None:
            return Status.INVALID_MEMORY_ACCESS
        queue = self.state.shared.queues.get(queue_id & 0xFFFFFFFF)
        if queue is None:
            return Status.NOT_FOUND
        # The item and its queue-ready notice; the item is refunded when dequeued.
        self.state.budget.charge(held(value), f"proxy_enqueue_shared_queue of {len(value)} bytes")
        queue[2].append(value)
        self.state.queue_ready.append((queue[1], queue_id))
        return Status.OK

    @host_function(params=(I32, I32, I32), results=(I32,))
    def proxy_dequeue_shared_queue(self, caller: Caller, queue_id: int, pp: int, sp: int) -> int:
        queue = self.state.shared.queues.get(queue_id & 0xFFFFFFFF)
        if queue is None:
            return Status.NOT_FOUND
        if not queue[2]:
            return Status.EMPTY
        item = queue[2].popleft()
        self.state.budget.refund(held(item))
        return self.state.memory.give(caller, item, pp, sp)

    # -- callouts --------------------------------------------------------------------------------

    @host_function(params=(I32, I32, I32, I32, I32, I32, I32, I32, I32, I32), results=(I32,))
    def proxy_http_call(
        self,
        caller: Caller,
        up: int,
        us: int,
        hp: int,
        hs: int,
        bp: int,
        bs: int,
        tp: int,
        ts: int,
        timeout_ms: int,
        ret: int,
    ) -> int:
        state = self.state
        announced = sum(n & 0xFFFFFFFF for n in (us, hs, bs, ts))
        self._check(announced, f"proxy_http_call of {announced} bytes")
        upstream, raw_headers = self._read(caller, up, us), self._read(caller, hp, hs)
        body, raw_trailers = self._read(caller, bp, bs), self._read(caller, tp, ts)
        if upstream is None or raw_headers is None or body is None or raw_trailers is None:
            return Status.INVALID_MEMORY_ACCESS
        headers, trailers = decode_pairs(raw_headers), decode_pairs(raw_trailers)
        if headers is None or trailers is None:
            return Status.BAD_ARGUMENT
        header_list = [(k.lower(), v) for k, v in _to_list(headers)]
        names = {k for k, _ in header_list}
        cluster = _text(upstream)
        clusters = state.clusters
        # Envoy refuses unknown clusters and requests without the three pseudo-headers.
        if (clusters is not None and cluster not in clusters) or not {
            ":authority",
            ":method",
            ":path",
        } <= names:
            return Status.BAD_ARGUMENT
        token = state.next_token
        if not state.memory.put_u32(caller, ret, token):
            return Status.INVALID_MEMORY_ACCESS
        # Envoy makes the call on the root context and answers it there (cpp-host exports.cc http_call).
        call = HttpCall(
            token, state.root_context_id, cluster, header_list, body, _to_list(trailers), timeout_ms & 0xFFFFFFFF
        )
        kept = held(cluster, body) + held_pairs(call.headers) + held_pairs(call.trailers) + ENTRY_BYTES
        state.budget.charge(kept, f"proxy_http_call to {cluster!r} with a {len(body)}-byte body", callout_scope(token))
        state.next_token += 1
        state.http_calls[token] = call
        return Status.OK

    def _grpc_refused(self, caller: Caller, up: int, us: int) -> int:
        """This host makes no gRPC calls. Envoy answers PARSE_FAILURE for a cluster it does not have;
        for one it has, the host answers UNIMPLEMENTED (docs/wasm-host.md)."""
        self._check(us, f"a gRPC call to a {us & 0xFFFFFFFF}-byte service")
        upstream = self._read(caller, up, us)
        if upstream is None:
            return Status.INVALID_MEMORY_ACCESS
        clusters = self.state.clusters
        if clusters is not None and _text(upstream) not in clusters:
            return Status.PARSE_FAILURE
        return Status.UNIMPLEMENTED

    @host_function(params=(I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32), results=(I32,))
    def proxy_grpc_call(self, caller: Caller, up: int, us: int, *args: int) -> int:
        return self._grpc_refused(caller, up, us)

    @host_function(params=(I32, I32, I32, I32, I32, I32, I32, I32, I32), results=(I32,))
    def proxy_grpc_stream(self, caller: Caller, up: int, us: int, *args: int) -> int:
        return self._grpc_refused(caller, up, us)

    @host_function(params=(I32, I32, I32, I32), results=(I32,))
    def proxy_grpc_send(self, caller: Caller, *args: int) -> int:
        return Status.NOT_FOUND

    @host_function(params=(I32,), results=(I32,))
    def proxy_grpc_cancel(self, caller: Caller, *args: int) -> int:
        return Status.NOT_FOUND

    @host_function(params=(I32,), results=(I32,))
    def proxy_grpc_close(self, caller: Caller, *args: int) -> int:
        return Status.NOT_FOUND

    @host_function(params=(I32, I32, I32, I32, I32, I32), results=(I32,))
    def proxy_call_foreign_function(
        self, caller: Caller, name_ptr: int, name_size: int, args_ptr: int, args_size: int, pp: int, sp: int
    ) -> int:
        self._check((name_size & 0xFFFFFFFF) + (args_size & 0xFFFFFFFF), "proxy_call_foreign_function")
        name, args = self._read(caller, name_ptr, name_size), self._read(caller, args_ptr, args_size)
        if name is None or args is None:
            return Status.INVALID_MEMORY_ACCESS
        result = call_foreign(_text(name), args, self.state.memory.size(caller))
        if isinstance(result, Status):
            return result
        return self.state.memory.give(caller, result, pp, sp)

    # -- emscripten leftovers Envoy also provides ------------------------------------------------

    @host_function(params=(I32, I32), results=(I32,))
    def pthread_equal(self, caller: Caller, a: int, b: int) -> int:
        return int(a == b)

    @host_function(params=(I32,))
    def emscripten_notify_memory_growth(self, caller: Caller, index: int) -> None:
        return None


def _id_type(metric_id: int) -> MetricType | None:
    """The metric type an id names: Envoy keeps it in the id's two low bits (3 names none)."""
    bits = metric_id & 3
    return MetricType(bits) if bits in tuple(MetricType) else None


def _held_reply(reply: LocalResponse) -> int:
    return held(reply.body, reply.details) + held_pairs(reply.headers)
