"""The `env.proxy_*` host functions, with Envoy's return codes, and linking them into a module.

Each function gets the wasmtime Caller first (used as the store for memory access and for calling
the guest allocator re-entrantly) and returns a proxy_status_t.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import wasmtime

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
from sidecar.wasm.host.errors import WasmLoadError
from sidecar.wasm.host.runtime import Runtime
from sidecar.wasm.host.state import HeaderList, HttpCall, LocalResponse, Metric
from sidecar.wasm.host.wasi import WASI_FUNCTIONS, Wasi

__all__ = ["ENV_FUNCTIONS", "link"]

Caller = Any


def _to_list(pairs: list[tuple[bytes, bytes]]) -> HeaderList:
    return [(k.decode(errors="surrogateescape"), v.decode(errors="surrogateescape")) for k, v in pairs]


def _to_bytes(headers: HeaderList) -> list[tuple[bytes, bytes]]:
    return [(k.encode(errors="surrogateescape"), v.encode(errors="surrogateescape")) for k, v in headers]


def _text(data: bytes) -> str:
    return data.decode(errors="surrogateescape")


class _Env:
    """Host functions bound to one Runtime."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    # -- helpers ----------------------------------------------------------------------------------

    def _read(self, caller: Caller, ptr: int, size: int) -> bytes | None:
        return self.rt.memory.read(caller, ptr, size)

    def _map(self, map_type: int) -> HeaderList | None:
        rt = self.rt
        if map_type in (MapType.HTTP_CALL_RESPONSE_HEADERS, MapType.HTTP_CALL_RESPONSE_TRAILERS):
            if rt.call_response is None:
                return None
            if map_type == MapType.HTTP_CALL_RESPONSE_HEADERS:
                return rt.call_response.headers
            return rt.call_response.trailers
        stream = rt.stream()
        if stream is None:
            return None
        maps: dict[int, HeaderList] = {
            MapType.HTTP_REQUEST_HEADERS: stream.request_headers,
            MapType.HTTP_REQUEST_TRAILERS: stream.request_trailers,
            MapType.HTTP_RESPONSE_HEADERS: stream.response_headers,
            MapType.HTTP_RESPONSE_TRAILERS: stream.response_trailers,
        }
        return maps.get(map_type)

    def _buffer(self, buffer_type: int) -> tuple[bytes, bool] | None:
        """The buffer's bytes and its end-of-stream flag."""
        rt = self.rt
        if buffer_type == BufferType.PLUGIN_CONFIGURATION:
            return rt.plugin_configuration, True
        if buffer_type == BufferType.VM_CONFIGURATION:
            return rt.options.vm_configuration, True
        if buffer_type == BufferType.HTTP_CALL_RESPONSE_BODY:
            return (rt.call_response.body, True) if rt.call_response is not None else None
        stream = rt.stream()
        if stream is None:
            return None
        if buffer_type == BufferType.HTTP_REQUEST_BODY:
            return bytes(stream.request_buffer), stream.request_end
        if buffer_type == BufferType.HTTP_RESPONSE_BODY:
            return bytes(stream.response_buffer), stream.response_end
        return None

    # -- logging, time, lifecycle ---------------------------------------------------------------

    def proxy_log(self, caller: Caller, level: int, ptr: int, size: int) -> int:
        message = self._read(caller, ptr, size)
        if message is None:
            return Status.INVALID_MEMORY_ACCESS
        if not 0 <= level <= LogLevel.CRITICAL:
            return Status.BAD_ARGUMENT
        if level >= self.rt.log_level:
            self.rt.log(LogLevel(level), _text(message))
        return Status.OK

    def proxy_get_log_level(self, caller: Caller, ret: int) -> int:
        return Status.OK if self.rt.memory.put_u32(caller, ret, self.rt.log_level) else Status.INVALID_MEMORY_ACCESS

    def proxy_get_current_time_nanoseconds(self, caller: Caller, ret: int) -> int:
        return Status.OK if self.rt.memory.put_u64(caller, ret, time.time_ns()) else Status.INVALID_MEMORY_ACCESS

    def proxy_set_tick_period_milliseconds(self, caller: Caller, period: int) -> int:
        self.rt.tick_period_ms = period & 0xFFFFFFFF
        return Status.OK

    def proxy_set_effective_context(self, caller: Caller, context_id: int) -> int:
        rt = self.rt
        if context_id != rt.root_context_id and context_id not in rt.streams:
            return Status.BAD_ARGUMENT
        rt.active_context = context_id
        return Status.OK

    def proxy_done(self, caller: Caller) -> int:
        return Status.OK

    def proxy_get_status(self, caller: Caller, code_ptr: int, msg_ptr_ptr: int, msg_size_ptr: int) -> int:
        code, message = self.rt.status
        if not self.rt.memory.put_u32(caller, code_ptr, code):
            return Status.INVALID_MEMORY_ACCESS
        return self.rt.memory.give(caller, message, msg_ptr_ptr, msg_size_ptr)

    # -- buffers --------------------------------------------------------------------------------

    def proxy_get_buffer_bytes(self, caller: Caller, btype: int, start: int, length: int, pp: int, sp: int) -> int:
        buffer = self._buffer(btype)
        if buffer is None:
            return Status.NOT_FOUND
        data = buffer[0]
        start, length = start & 0xFFFFFFFF, length & 0xFFFFFFFF
        return self.rt.memory.give(caller, data[start : start + length], pp, sp)

    def proxy_get_buffer_status(self, caller: Caller, btype: int, size_ptr: int, flags_ptr: int) -> int:
        buffer = self._buffer(btype)
        if buffer is None:
            return Status.NOT_FOUND
        mem = self.rt.memory
        if not (mem.put_u32(caller, size_ptr, len(buffer[0])) and mem.put_u32(caller, flags_ptr, int(buffer[1]))):
            return Status.INVALID_MEMORY_ACCESS
        return Status.OK

    def proxy_set_buffer_bytes(self, caller: Caller, btype: int, start: int, length: int, ptr: int, size: int) -> int:
        data = self._read(caller, ptr, size)
        if data is None:
            return Status.INVALID_MEMORY_ACCESS
        stream = self.rt.stream()
        if stream is None or btype not in (BufferType.HTTP_REQUEST_BODY, BufferType.HTTP_RESPONSE_BODY):
            return Status.NOT_FOUND
        buf = stream.request_buffer if btype == BufferType.HTTP_REQUEST_BODY else stream.response_buffer
        start, length = start & 0xFFFFFFFF, length & 0xFFFFFFFF
        # Envoy's body buffers only support replacing from the front and appending.
        if start == 0:
            del buf[: min(length, len(buf))]
            buf[0:0] = data
        elif start >= len(buf):
            buf.extend(data)
        else:
            return Status.BAD_ARGUMENT
        return Status.OK

    def proxy_get_configuration(self, caller: Caller, pp: int, sp: int) -> int:
        return self.rt.memory.give(caller, self.rt.plugin_configuration, pp, sp)

    # -- header maps ----------------------------------------------------------------------------

    def proxy_get_header_map_size(self, caller: Caller, map_type: int, ret: int) -> int:
        headers = self._map(map_type)
        if headers is None:
            return Status.BAD_ARGUMENT
        size = sum(len(k.encode()) + len(v.encode()) for k, v in headers)
        return Status.OK if self.rt.memory.put_u32(caller, ret, size) else Status.INVALID_MEMORY_ACCESS

    def proxy_get_header_map_pairs(self, caller: Caller, map_type: int, pp: int, sp: int) -> int:
        headers = self._map(map_type)
        if headers is None:
            return Status.BAD_ARGUMENT
        return self.rt.memory.give(caller, encode_pairs(_to_bytes(headers)), pp, sp)

    def proxy_set_header_map_pairs(self, caller: Caller, map_type: int, ptr: int, size: int) -> int:
        headers = self._map(map_type)
        data = self._read(caller, ptr, size)
        if data is None:
            return Status.INVALID_MEMORY_ACCESS
        if headers is None:
            return Status.BAD_ARGUMENT
        pairs = decode_pairs(data)
        if pairs is None:
            return Status.BAD_ARGUMENT
        headers[:] = [(k.lower(), v) for k, v in _to_list(pairs)]
        return Status.OK

    def _key_value(self, caller: Caller, kp: int, ks: int, vp: int = 0, vs: int = 0) -> tuple[str, str] | None:
        key = self._read(caller, kp, ks)
        value = self._read(caller, vp, vs)
        if key is None or value is None:
            return None
        return _text(key).lower(), _text(value)

    def proxy_get_header_map_value(self, caller: Caller, map_type: int, kp: int, ks: int, pp: int, sp: int) -> int:
        kv = self._key_value(caller, kp, ks)
        if kv is None:
            return Status.INVALID_MEMORY_ACCESS
        headers = self._map(map_type)
        if headers is None:
            return Status.BAD_ARGUMENT
        values = [v for k, v in headers if k == kv[0]]
        if not values:
            # ABI 0.1.0 hosts answered OK with an empty value; NOT_FOUND since 0.2.0.
            if self.rt.abi.legacy:
                return self.rt.memory.give(caller, b"", pp, sp)
            return Status.NOT_FOUND
        # Envoy answers with the first of repeated headers (checked against Envoy 1.40).
        return self.rt.memory.give(caller, values[0].encode(errors="surrogateescape"), pp, sp)

    def proxy_add_header_map_value(self, caller: Caller, map_type: int, kp: int, ks: int, vp: int, vs: int) -> int:
        kv = self._key_value(caller, kp, ks, vp, vs)
        if kv is None:
            return Status.INVALID_MEMORY_ACCESS
        headers = self._map(map_type)
        if headers is None:
            return Status.BAD_ARGUMENT
        headers.append(kv)
        return Status.OK

    def proxy_replace_header_map_value(self, caller: Caller, map_type: int, kp: int, ks: int, vp: int, vs: int) -> int:
        kv = self._key_value(caller, kp, ks, vp, vs)
        if kv is None:
            return Status.INVALID_MEMORY_ACCESS
        headers = self._map(map_type)
        if headers is None:
            return Status.BAD_ARGUMENT
        index = next((i for i, (k, _) in enumerate(headers) if k == kv[0]), None)
        if index is None:
            headers.append(kv)
        else:
            headers[:] = [h for i, h in enumerate(headers) if h[0] != kv[0] or i == index]
            headers[index] = kv
        return Status.OK

    def proxy_remove_header_map_value(self, caller: Caller, map_type: int, kp: int, ks: int) -> int:
        kv = self._key_value(caller, kp, ks)
        if kv is None:
            return Status.INVALID_MEMORY_ACCESS
        headers = self._map(map_type)
        if headers is None:
            return Status.BAD_ARGUMENT
        headers[:] = [h for h in headers if h[0] != kv[0]]
        return Status.OK

    # -- stream control -------------------------------------------------------------------------

    def proxy_continue_stream(self, caller: Caller, stream_type: int) -> int:
        stream = self.rt.stream()
        if stream is None:
            return Status.NOT_FOUND
        if stream_type == StreamType.HTTP_REQUEST:
            stream.continue_request = True
        elif stream_type == StreamType.HTTP_RESPONSE:
            stream.continue_response = True
        else:
            return Status.BAD_ARGUMENT
        return Status.OK

    def proxy_close_stream(self, caller: Caller, stream_type: int) -> int:
        stream = self.rt.stream()
        if stream is None:
            return Status.NOT_FOUND
        if stream_type not in (StreamType.HTTP_REQUEST, StreamType.HTTP_RESPONSE):
            return Status.BAD_ARGUMENT
        stream.closed = True
        return Status.OK

    def proxy_continue_request(self, caller: Caller) -> int:
        return self.proxy_continue_stream(caller, StreamType.HTTP_REQUEST)

    def proxy_continue_response(self, caller: Caller) -> int:
        return self.proxy_continue_stream(caller, StreamType.HTTP_RESPONSE)

    def proxy_clear_route_cache(self, caller: Caller) -> int:
        return Status.OK

    def proxy_send_local_response(
        self, caller: Caller, status: int, dp: int, ds: int, bp: int, bs: int, hp: int, hs: int, grpc: int
    ) -> int:
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
        stream = self.rt.stream()
        if stream is None:
            return Status.NOT_FOUND
        grpc_status = None if grpc < 0 or grpc > 0xFFFF else grpc
        headers = [(k.lower(), v) for k, v in _to_list(pairs)]
        stream.local_response = LocalResponse(status, headers, body, _text(details), grpc_status)
        return Status.OK

    # -- properties -----------------------------------------------------------------------------

    def proxy_get_property(self, caller: Caller, path_ptr: int, path_size: int, pp: int, sp: int) -> int:
        path = self._read(caller, path_ptr, path_size)
        if path is None:
            return Status.INVALID_MEMORY_ACCESS
        rt = self.rt
        value = rt.properties.get(path, rt.stream())
        if value is None:
            return Status.NOT_FOUND
        return rt.memory.give(caller, value, pp, sp)

    def proxy_set_property(self, caller: Caller, path_ptr: int, path_size: int, vp: int, vs: int) -> int:
        path, value = self._read(caller, path_ptr, path_size), self._read(caller, vp, vs)
        if path is None or value is None:
            return Status.INVALID_MEMORY_ACCESS
        self.rt.properties.set(path, value)
        return Status.OK

    # -- metrics ---------------------------------------------------------------------------------

    def proxy_define_metric(self, caller: Caller, mtype: int, np: int, ns: int, ret: int) -> int:
        name = self._read(caller, np, ns)
        if name is None:
            return Status.INVALID_MEMORY_ACCESS
        if mtype not in tuple(MetricType):
            return Status.BAD_ARGUMENT
        rt = self.rt
        key = (mtype, _text(name))
        metric_id = rt.metric_ids.get(key)
        if metric_id is None:
            # Envoy encodes the type in the low bits of the id; any stable distinct id will do.
            metric_id = rt.metric_ids[key] = (len(rt.metric_ids) + 1) << 2 | mtype
            rt.metrics[metric_id] = Metric(metric_id, MetricType(mtype), key[1])
        return Status.OK if rt.memory.put_u32(caller, ret, metric_id) else Status.INVALID_MEMORY_ACCESS

    def proxy_increment_metric(self, caller: Caller, metric_id: int, delta: int) -> int:
        metric = self.rt.metrics.get(metric_id & 0xFFFFFFFF)
        if metric is None:
            return Status.NOT_FOUND
        if metric.type == MetricType.HISTOGRAM or (metric.type == MetricType.COUNTER and delta < 0):
            return Status.BAD_ARGUMENT
        metric.value += delta
        return Status.OK

    def proxy_record_metric(self, caller: Caller, metric_id: int, value: int) -> int:
        metric = self.rt.metrics.get(metric_id & 0xFFFFFFFF)
        if metric is None:
            return Status.NOT_FOUND
        value &= 0xFFFFFFFFFFFFFFFF
        if metric.type == MetricType.COUNTER:
            metric.value += value
        elif metric.type == MetricType.GAUGE:
            metric.value = value
        else:
            self.rt.histograms.setdefault(metric.name, []).append(value)
            metric.value = value
        return Status.OK

    def proxy_get_metric(self, caller: Caller, metric_id: int, ret: int) -> int:
        metric = self.rt.metrics.get(metric_id & 0xFFFFFFFF)
        if metric is None:
            return Status.NOT_FOUND
        if metric.type == MetricType.HISTOGRAM:
            return Status.BAD_ARGUMENT
        return Status.OK if self.rt.memory.put_u64(caller, ret, metric.value) else Status.INVALID_MEMORY_ACCESS

    # -- shared data and queues -------------------------------------------------------------------

    def proxy_get_shared_data(self, caller: Caller, kp: int, ks: int, pp: int, sp: int, cas_ptr: int) -> int:
        key = self._read(caller, kp, ks)
        if key is None:
            return Status.INVALID_MEMORY_ACCESS
        entry = self.rt.shared.data.get(key)
        if entry is None:
            return Status.NOT_FOUND
        if not self.rt.memory.put_u32(caller, cas_ptr, entry[1]):
            return Status.INVALID_MEMORY_ACCESS
        return self.rt.memory.give(caller, entry[0], pp, sp)

    def proxy_set_shared_data(self, caller: Caller, kp: int, ks: int, vp: int, vs: int, cas: int) -> int:
        key, value = self._read(caller, kp, ks), self._read(caller, vp, vs)
        if key is None or value is None:
            return Status.INVALID_MEMORY_ACCESS
        current = self.rt.shared.data.get(key)
        cas &= 0xFFFFFFFF
        if cas and current is not None and current[1] != cas:
            return Status.CAS_MISMATCH
        self.rt.shared.data[key] = (value, (current[1] + 1) if current else 1)
        return Status.OK

    def proxy_register_shared_queue(self, caller: Caller, np: int, ns: int, ret: int) -> int:
        name = self._read(caller, np, ns)
        if name is None:
            return Status.INVALID_MEMORY_ACCESS
        shared = self.rt.shared
        queue_id = shared.queue_ids.get(name)
        if queue_id is None:
            queue_id = shared.queue_ids[name] = len(shared.queue_ids) + 1
            shared.queues[queue_id] = (name, self.rt.root_context_id, deque())
        return Status.OK if self.rt.memory.put_u32(caller, ret, queue_id) else Status.INVALID_MEMORY_ACCESS

    def proxy_resolve_shared_queue(self, caller: Caller, vp: int, vs: int, np: int, ns: int, ret: int) -> int:
        vm_id, name = self._read(caller, vp, vs), self._read(caller, np, ns)
        if vm_id is None or name is None:
            return Status.INVALID_MEMORY_ACCESS
        queue_id = self.rt.shared.queue_ids.get(name)
        if queue_id is None:
            return Status.NOT_FOUND
        return Status.OK if self.rt.memory.put_u32(caller, ret, queue_id) else Status.INVALID_MEMORY_ACCESS

    def proxy_enqueue_shared_queue(self, caller: Caller, queue_id: int, vp: int, vs: int) -> int:
        value = self._read(caller, vp, vs)
        if value is None:
            return Status.INVALID_MEMORY_ACCESS
        queue = self.rt.shared.queues.get(queue_id & 0xFFFFFFFF)
        if queue is None:
            return Status.NOT_FOUND
        queue[2].append(value)
        self.rt.queue_ready.append((queue[1], queue_id))
        return Status.OK

    def proxy_dequeue_shared_queue(self, caller: Caller, queue_id: int, pp: int, sp: int) -> int:
        queue = self.rt.shared.queues.get(queue_id & 0xFFFFFFFF)
        if queue is None:
            return Status.NOT_FOUND
        if not queue[2]:
            return Status.EMPTY
        return self.rt.memory.give(caller, queue[2].popleft(), pp, sp)

    # -- callouts --------------------------------------------------------------------------------

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
        rt = self.rt
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
        clusters = rt.options.clusters
        # Envoy refuses unknown clusters and requests without the three pseudo-headers.
        if (clusters is not None and cluster not in clusters) or not {
            ":authority",
            ":method",
            ":path",
        } <= names:
            return Status.BAD_ARGUMENT
        token = rt.next_token
        rt.next_token += 1
        if not rt.memory.put_u32(caller, ret, token):
            return Status.INVALID_MEMORY_ACCESS
        # Envoy makes the call on the root context and answers it there (cpp-host exports.cc http_call).
        rt.http_calls[token] = HttpCall(
            token, rt.root_context_id, cluster, header_list, body, _to_list(trailers), timeout_ms & 0xFFFFFFFF
        )
        return Status.OK

    def proxy_grpc_call(self, caller: Caller, *args: int) -> int:
        return Status.UNIMPLEMENTED

    def proxy_grpc_stream(self, caller: Caller, *args: int) -> int:
        return Status.UNIMPLEMENTED

    def proxy_grpc_send(self, caller: Caller, *args: int) -> int:
        return Status.NOT_FOUND

    def proxy_grpc_cancel(self, caller: Caller, *args: int) -> int:
        return Status.NOT_FOUND

    def proxy_grpc_close(self, caller: Caller, *args: int) -> int:
        return Status.NOT_FOUND

    def proxy_call_foreign_function(self, caller: Caller, *args: int) -> int:
        # Envoy registers a handful of foreign functions (e.g. compress); none are emulated here.
        return Status.NOT_FOUND

    # -- emscripten leftovers Envoy also provides ------------------------------------------------

    def pthread_equal(self, caller: Caller, a: int, b: int) -> int:
        return int(a == b)

    def emscripten_notify_memory_growth(self, caller: Caller, index: int) -> None:
        return None


# name -> (params, results); "i" = i32, "I" = i64.
ENV_FUNCTIONS: dict[str, tuple[str, str]] = {
    "proxy_log": ("iii", "i"),
    "proxy_get_log_level": ("i", "i"),
    "proxy_get_current_time_nanoseconds": ("i", "i"),
    "proxy_set_tick_period_milliseconds": ("i", "i"),
    "proxy_set_effective_context": ("i", "i"),
    "proxy_done": ("", "i"),
    "proxy_get_status": ("iii", "i"),
    "proxy_get_buffer_bytes": ("iiiii", "i"),
    "proxy_get_buffer_status": ("iii", "i"),
    "proxy_set_buffer_bytes": ("iiiii", "i"),
    "proxy_get_configuration": ("ii", "i"),
    "proxy_get_header_map_size": ("ii", "i"),
    "proxy_get_header_map_pairs": ("iii", "i"),
    "proxy_set_header_map_pairs": ("iii", "i"),
    "proxy_get_header_map_value": ("iiiii", "i"),
    "proxy_add_header_map_value": ("iiiii", "i"),
    "proxy_replace_header_map_value": ("iiiii", "i"),
    "proxy_remove_header_map_value": ("iii", "i"),
    "proxy_continue_stream": ("i", "i"),
    "proxy_close_stream": ("i", "i"),
    "proxy_continue_request": ("", "i"),
    "proxy_continue_response": ("", "i"),
    "proxy_clear_route_cache": ("", "i"),
    "proxy_send_local_response": ("iiiiiiii", "i"),
    "proxy_get_property": ("iiii", "i"),
    "proxy_set_property": ("iiii", "i"),
    "proxy_define_metric": ("iiii", "i"),
    "proxy_increment_metric": ("iI", "i"),
    "proxy_record_metric": ("iI", "i"),
    "proxy_get_metric": ("ii", "i"),
    "proxy_get_shared_data": ("iiiii", "i"),
    "proxy_set_shared_data": ("iiiii", "i"),
    "proxy_register_shared_queue": ("iii", "i"),
    "proxy_resolve_shared_queue": ("iiiii", "i"),
    "proxy_enqueue_shared_queue": ("iii", "i"),
    "proxy_dequeue_shared_queue": ("iii", "i"),
    "proxy_http_call": ("iiiiiiiiii", "i"),
    "proxy_grpc_call": ("iiiiiiiiiiii", "i"),
    "proxy_grpc_stream": ("iiiiiiiii", "i"),
    "proxy_grpc_send": ("iiii", "i"),
    "proxy_grpc_cancel": ("i", "i"),
    "proxy_grpc_close": ("i", "i"),
    "proxy_call_foreign_function": ("iiiiii", "i"),
    "pthread_equal": ("ii", "i"),
    "emscripten_notify_memory_growth": ("i", ""),
}

_VALTYPES = {"i": wasmtime.ValType.i32(), "I": wasmtime.ValType.i64()}


def _signature(params: str, results: str) -> wasmtime.FuncType:
    return wasmtime.FuncType([_VALTYPES[c] for c in params], [_VALTYPES[c] for c in results])


def link(linker: wasmtime.Linker, rt: Runtime) -> None:
    """Define exactly the imports the module asks for; a missing one fails the load, as in Envoy."""
    env, wasi = (ENV_FUNCTIONS, _Env(rt)), (WASI_FUNCTIONS, Wasi(rt))
    # Envoy registers WASI under both names (cpp-host src/wasm.cc).
    providers: dict[str, tuple[dict[str, tuple[str, str]], object]] = {
        "env": env,
        "wasi_snapshot_preview1": wasi,
        "wasi_unstable": wasi,
    }
    defined: set[tuple[str, str]] = set()
    for imp in rt.module.imports:
        table, target = providers.get(imp.module, ({}, None))
        name = imp.name or ""
        where = f"{rt.module_name}: import {imp.module}.{name}"
        if target is None or name not in table:
            raise WasmLoadError(f"{where} is not provided by the host (nor by Envoy's)")
        expected = _signature(*table[name])
        wanted = imp.type
        if not isinstance(wanted, wasmtime.FuncType) or (
            list(map(str, wanted.params)),
            list(map(str, wanted.results)),
        ) != (list(map(str, expected.params)), list(map(str, expected.results))):
            raise WasmLoadError(f"{where} has the wrong signature for the proxy-wasm ABI")
        if (imp.module, name) not in defined:  # a module may import the same function twice
            defined.add((imp.module, name))
            linker.define_func(imp.module, name, expected, getattr(target, name), access_caller=True)
