"""A small HTTP/2 server for gRPC calls, running entirely on the asyncio event loop.

Why it exists: grpcio's asyncio server hands every message between its C-core threads and the event
loop; on a 2-core machine a do-nothing two-message ext_proc stream costs it ~320 us of CPU, over the
sidecar's whole budget. Framing the same calls on the loop thread costs a fraction of that
(`docs/benchmarks.md`). `transport: grpcio` keeps grpcio available.

What it implements of RFC 9113, for gRPC servers: the connection preface, SETTINGS, flow control in both
directions (receive credit is returned as the handler consumes messages, so a slow handler holds back
its peer instead of buffering without bound), PING, RST_STREAM, CONTINUATION, padding, and a two-step
graceful GOAWAY. Header blocks are decoded by the `hpack` package; responses are encoded without the
dynamic table. Not implemented, by design: server push, priorities, message compression (a compressed
message ends its call with INTERNAL) and h2c upgrade from HTTP/1.1.

Layers, each on the ones before it:

* `frames`      the frame codec: frame header, RST_STREAM/GOAWAY/WINDOW_UPDATE builders, SETTINGS, limits
* `flow`        flow-control windows, receiving and sending
* `call`        one gRPC call on one stream: messages in and out, status, receive buffer accounting
* `connection`  one HTTP/2 connection's state machine: frames in, calls opened, errors, draining
* `server`      routes, listeners, graceful stop

gRPC status codes live outside the transport, in `sidecar.extproc.status`.
"""

from sidecar.extproc.http2.call import Call, Handler
from sidecar.extproc.http2.server import Http2Server

__all__ = ["Call", "Handler", "Http2Server"]
