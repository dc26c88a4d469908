"""What every omnistage gRPC server shares: message limits, health, reflection and binding."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from omnistage.rpc import SERVER_OPTIONS


class GrpcServer:
    """A grpc.aio server serving `service` beside the health service and reflection."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (service, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    def bind(self, host: str, port: int) -> int:
        """Listen on host:port (port 0 picks a free one); return the bound port."""
        bound = self.server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"could not bind {host}:{port}; is the port taken?")
        return int(bound)

    async def set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """The status of the server as a whole and of its service."""
        for name in ("", self.service):
            await self.health.set(name, status)
