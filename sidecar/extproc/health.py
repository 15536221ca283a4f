"""`grpc.health.v1.Health` (Check and Watch) for the native transport.

Envoy Gateway's active health check asks for `envoy.service.ext_proc.v3.ExternalProcessor`; probes
usually ask for `""`. Unknown services get NOT_FOUND from Check and SERVICE_UNKNOWN from Watch, as the
gRPC health protocol says.
"""

from __future__ import annotations

import asyncio

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from sidecar.extproc.http2 import Call, Handler
from sidecar.extproc.status import CallError, Status

__all__ = ["Health"]

_SERVICE = "/grpc.health.v1.Health/"


class Health:
    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed: asyncio.Event = asyncio.Event()
        self._closed = False

    def set(self, service: str, status: int) -> None:
        self._status[service] = status
        self._changed.set()
        self._changed = asyncio.Event()

    def shutdown(self) -> None:
        """Every service NOT_SERVING, so health checks steer traffic away while streams drain.

        Open Watch calls get the NOT_SERVING and then end, so they do not hold the drain up."""
        self._closed = True
        for service in list(self._status):
            self.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    def routes(self) -> dict[str, Handler]:
        return {_SERVICE + "Check": self.check, _SERVICE + "Watch": self.watch}

    @staticmethod
    async def _service(call: Call) -> str:
        data = await call.read()
        try:
            service: str = health_pb2.HealthCheckRequest.FromString(data or b"").service
        except DecodeError:
            raise CallError(Status.INVALID_ARGUMENT, "malformed HealthCheckRequest") from None
        return service

    async def check(self, call: Call) -> None:
        service = await self._service(call)
        status = self._status.get(service)
        if status is None:
            raise CallError(Status.NOT_FOUND, "unknown service")
        await call.send(health_pb2.HealthCheckResponse(status=status).SerializeToString())

    async def watch(self, call: Call) -> None:
        service = await self._service(call)
        sent: int | None = None
        while True:
            changed = self._changed
            status = self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != sent:
                await call.send(health_pb2.HealthCheckResponse(status=status).SerializeToString())
                sent = status
            if self._closed:
                return
            await changed.wait()
