"""What every omnistage gRPC server shares: message limits, health, reflection, binding, the
error mapping, transport security (TLS or mTLS, a bearer token, a plaintext health-only port),
and the serve loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from omnistage.rpc import SERVER_OPTIONS
from omnistage.security import ServerSecurity
from omnistage.server.auth import BearerTokenInterceptor
from omnistage.server.errors import ErrorInterceptor

logger = logging.getLogger(__name__)


class GrpcServer:
    """A grpc.aio server serving `service` beside the health service and reflection."""

    def __init__(
        self,
        service: str,
        *,
        security: ServerSecurity | None = None,
        on_unavailable: Callable[[], None] | None = None,
    ) -> None:
        self.service = service
        self.security = security or ServerSecurity()
        # The token is checked first, before a request is even decoded; then every error of
        # an RPC body becomes its status.
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.security.token:
            interceptors.append(
                BearerTokenInterceptor(self.security.token, scope=self.security.auth_scope)
            )
        interceptors.append(ErrorInterceptor(on_unavailable=on_unavailable))
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (service, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self._health_server: grpc.aio.Server | None = None

    def bind(self, host: str, port: int) -> int:
        """Listen on host:port (port 0 picks a free one), with TLS when configured; return the
        bound port."""
        address = f"{host}:{port}"
        if self.security.tls:
            bound = self.server.add_secure_port(address, self.security.credentials())
        else:
            bound = self.server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"could not bind {address}; is the port taken?")
        logger.info("%s on port %d: %s", self.service, bound, self.security.describe())
        return int(bound)

    def bind_ports(self, host: str, port: int, health_port: int | None) -> tuple[int, int | None]:
        """`bind`, and `bind_health` when a health port is given; the two bound ports."""
        bound = self.bind(host, port)
        return bound, None if health_port is None else self.bind_health(host, health_port)

    def bind_health(self, host: str, port: int) -> int:
        """A second, plaintext port that serves only grpc.health.v1, from the same health
        servicer: for probes that cannot speak TLS (Kubernetes' gRPC probes). Returns it."""
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"could not bind the health port {host}:{port}; is it taken?")
        self._health_server = server
        logger.info("plaintext health service on port %d", bound)
        return int(bound)

    async def start(self) -> None:
        await self.server.start()
        if self._health_server is not None:
            await self._health_server.start()

    async def stop(self, grace: float | None) -> None:
        """Stop the main port within `grace`, then the health port."""
        try:
            await self.server.stop(grace)
        finally:
            if self._health_server is not None:
                await self._health_server.stop(None)

    async def set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """The status of the server as a whole and of its service."""
        for name in ("", self.service):
            await self.health.set(name, status)


async def serve_until_signalled(
    start: Callable[[], Coroutine[Any, Any, None]],
    stop: Callable[[], Coroutine[Any, Any, None]],
    *,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Run a server until SIGTERM or SIGINT, then stop it. A signal during `start` (an engine
    loading) cancels the start; `stop` runs in every case."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        starting = asyncio.create_task(start())
        stop_wait = asyncio.create_task(stopping.wait())
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            if on_started is not None:
                on_started()
            await stop_wait
        else:
            starting.cancel()
            stop_wait.cancel()
    finally:
        await stop()
