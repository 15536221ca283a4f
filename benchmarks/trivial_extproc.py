"""The floor: a grpc.aio ext_proc server that answers every message with a constant "continue".

`benchmarks/extproc.py` runs it next to the sidecar so the cost of gRPC itself is measured in the same
run. With `--full-duplex` it answers body chunks as FULL_DUPLEX_STREAMED requires, each one sent straight
back as a `streamed_response`: `benchmarks/streaming.py --trivial` runs it in both modes, so what Envoy
itself spends per MiB in each mode is measured with a server that is not the sidecar.

Usage: python benchmarks/trivial_extproc.py SOCKET_PATH [--full-duplex]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

KINDS = [f"{direction}_{part}" for direction in ("request", "response") for part in ("headers", "body", "trailers")]


def _answer(kind: str) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse()
    getattr(response, kind).SetInParent()
    return response


ANSWERS = {kind: _answer(kind) for kind in KINDS}


def _streamed(kind: str, body: pb.HttpBody) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse()
    streamed = getattr(response, kind).response.body_mutation.streamed_response
    streamed.body = body.body
    streamed.end_of_stream = body.end_of_stream
    return response


class Trivial:
    def __init__(self, full_duplex: bool) -> None:
        self.full_duplex = full_duplex

    async def Process(self, requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while (request := await context.read()) is not grpc.aio.EOF:
            kind = request.WhichOneof("request")
            if self.full_duplex and kind.endswith("_body"):
                await context.write(_streamed(kind, getattr(request, kind)))
            else:
                await context.write(ANSWERS[kind])


async def main(path: str, full_duplex: bool) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(Trivial(full_duplex), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("socket")
    parser.add_argument("--full-duplex", action="store_true", help="echo body chunks as streamed_response")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(args.socket, args.full_duplex))
