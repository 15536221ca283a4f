"""The Python cost per request of the in-process bridge, against the ext_proc processor in the same run.

One request is what Envoy's filters hand the plugin layer for the header-stamp plugin
(`sidecar_plugins.stamp:HeaderStamp`): the request headers, then the response headers. The bridge side is
what the native module calls (`new_stream`, `request_headers`, `response_headers`, `close`) on Envoy's
header pairs; the ext_proc side is `StreamProcessor.process` on the two ProcessingRequests with the server's
Metrics, as the sidecar runs it (no transport). Both run N requests per round; the best round of R counts.

    python benchmarks/inprocess_micro.py [--requests 20000] [--rounds 5]

It prints µs per request for each path and their ratio. Issue 17's target: the bridge ≤ 10 µs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

REQUEST = [
    (":authority", b"localhost:10000"),
    (":path", b"/items/42?view=full"),
    (":method", b"GET"),
    (":scheme", b"http"),
    ("user-agent", b"wrk"),
    ("accept", b"*/*"),
    ("x-forwarded-proto", b"http"),
    ("x-request-id", b"6f1c1b8e-9f5d-4d55-8a5e-2b1d3c4e5f60"),
]
REQUEST_ID = dict(REQUEST)["x-request-id"]
RESPONSE = [
    (":status", b"200"),
    ("content-type", b"text/plain"),
    ("content-length", b"2"),
    ("date", b"Sat, 05 Dec 2026 04:00:00 GMT"),
    ("server", b"envoy"),
]
CONFIG = "plugins:\n  - use: header-stamp\n"


class _Native:
    @staticmethod
    def schedule(handle: int) -> bool:
        return True


def bridge_round(config: Any, requests: int) -> float:
    """Seconds for `requests` requests through the bridge."""
    new_stream = config.new_stream
    started = time.thread_time()
    for handle in range(requests):
        stream = new_stream(handle)
        # A fresh list each call, and the request id handed over beside it, as the native module does.
        stream.request_headers(list(REQUEST), True, REQUEST_ID)
        stream.response_headers(list(RESPONSE), True)
        stream.close()
    return time.thread_time() - started


def extproc_round(registry: Any, requests: int) -> float:
    """Seconds for `requests` requests through the ext_proc processor (in one event loop, as a worker runs)."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from sidecar.extproc.metrics import Metrics
    from sidecar.extproc.processor import StreamProcessor

    def message(kind: str, pairs: list[tuple[str, bytes]]) -> Any:
        headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in pairs])
        return pb.ProcessingRequest(**{kind: pb.HttpHeaders(headers=headers, end_of_stream=True)})

    request, response = message("request_headers", REQUEST), message("response_headers", RESPONSE)
    chain = registry.default
    metrics = Metrics()

    async def run() -> float:
        started = time.thread_time()
        for _ in range(requests):
            processor = StreamProcessor(chain, registry, metrics=metrics)
            await processor.process(request)
            await processor.process(response)
            processor.close()
        return time.thread_time() - started

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from sidecar.chains import load_sidecar
    from sidecar.inprocess.bridge import configure

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sidecar.yaml"
        path.write_text(CONFIG)
        config = configure(json.dumps({"config": str(path), "chain": "default"}), _Native())
        _, registry = load_sidecar(path)
    bridge = min(bridge_round(config, args.requests) for _ in range(args.rounds))
    extproc = min(extproc_round(registry, args.requests) for _ in range(args.rounds))
    per = 1e6 / args.requests
    print(f"header-stamp, request + response headers; {args.requests} requests, best of {args.rounds}")
    print(f"  in-process bridge        {bridge * per:6.2f} µs/request")
    print(f"  ext_proc StreamProcessor {extproc * per:6.2f} µs/request")
    print(f"  ratio bridge/ext_proc    {bridge / extproc:6.2f}")


if __name__ == "__main__":
    main()
