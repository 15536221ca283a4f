"""The floor: a grpc.aio ext_proc server that answers every message with a constant "continue".

`benchmarks/extproc.py` runs it next to the sidecar so the cost of gRPC itself is measured in the same
run. Usage: python benchmarks/trivial_extproc.py SOCKET_PATH
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc


def _answer(kind: str) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse()
    getattr(response, kind).SetInParent()
    return response


ANSWERS = {kind: _answer(kind) for kind in ("request_headers", "response_headers", "request_body", "response_body")}


class Trivial:
    async def Process(self, requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while (request := await context.read()) is not grpc.aio.EOF:
            await context.write(ANSWERS[request.WhichOneof("request")])


async def main(path: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(Trivial(), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(sys.argv[1]))
