"""The ext_proc gRPC server.

* `server`     one serving process: listeners, both transports, health, graceful stop
* `lifetime`   one stream from first message to end (`serve`), for every transport and the test driver
* `processor`  the ext_proc state machine of one stream (`StreamProcessor`): messages to chain hooks
* `duplex`     FULL_DUPLEX_STREAMED body pipelines for stream hooks
* `status`     gRPC status codes, transport-neutral
* `http2/`     the native HTTP/2 gRPC transport (frames, flow, call, connection, server)
* `health`     `grpc.health.v1` on the native transport
* `metrics`    Prometheus metrics; `workers` the supervisor of N worker processes
* `allocator`  glibc's malloc thresholds, set so body buffers are reused rather than faulted in again
"""
