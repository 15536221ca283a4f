"""gRPC health on the native transport, through grpcio's client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.extproc.health import Health
from sidecar.extproc.http2 import Http2Server

pytestmark = pytest.mark.asyncio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


async def test_check_and_watch_follow_the_status_until_shutdown(tmp_path: Path) -> None:
    health = Health()
    health.set("", SERVING)
    server = Http2Server(health.routes(), max_message=1024)
    path = tmp_path / "health.sock"
    server.add_listener(await asyncio.get_running_loop().create_unix_server(server.protocol, path=str(path)))
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert (await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
            unknown = stub.Watch(health_pb2.HealthCheckRequest(service="other"), timeout=5)
            assert (await watch.read()).status == SERVING
            assert (await unknown.read()).status == UNKNOWN
            health.shutdown()
            assert (await watch.read()).status == NOT_SERVING
            assert await watch.read() is grpc.aio.EOF  # watchers end, so they do not hold a drain up
            assert await watch.code() == grpc.StatusCode.OK
            assert await unknown.read() is grpc.aio.EOF
    finally:
        await server.stop(1)
