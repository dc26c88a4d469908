"""Build and run the orchestrator's gRPC server."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from grpc_health.v1 import health_pb2

from omnistage.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.config import PipelineConfig
from orchestrator.pool import StagePool
from orchestrator.profiling import PipelineProfiler
from orchestrator.runner import PipelineRunner
from orchestrator.servicer import OrchestratorServicer
from services.serving import GrpcServer

logger = logging.getLogger(__name__)

ORCHESTRATOR_SERVICE = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name


class OrchestratorServer:
    """The orchestrator: a grpc.aio server, its health service and its stage clients."""

    def __init__(self, pipeline: PipelineConfig, *, host: str, port: int) -> None:
        self.pipeline = pipeline
        self.pool = StagePool(pipeline)
        self.profiler = PipelineProfiler(
            pipeline, self.pool, default_output_dir=pipeline.default_profile_dir()
        )
        self._grpc = GrpcServer(ORCHESTRATOR_SERVICE)
        self.server, self.health = self._grpc.server, self._grpc.health
        servicer = OrchestratorServicer(
            pipeline=pipeline,
            pool=self.pool,
            runner=PipelineRunner(pipeline, self.pool, on_stage_done=self.profiler.record),
            profiler=self.profiler,
        )
        orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(servicer, self.server)
        self.port = self._grpc.bind(host, port)

    async def start(self) -> None:
        await self.pool.start()
        await self.server.start()
        await self._grpc.set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "orchestrator for %r SERVING on port %d: %s",
            self.pipeline.name,
            self.port,
            " → ".join(s.name for s in self.pipeline.stages),
        )

    async def stop(self, grace: float = 30.0) -> None:
        try:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)
        finally:
            await self.pool.close()


async def serve(
    pipeline: PipelineConfig,
    *,
    host: str = "0.0.0.0",
    port: int = 0,
    on_bound: Callable[[int], None] | None = None,
) -> None:
    """Run the orchestrator until SIGTERM or SIGINT."""
    server = OrchestratorServer(pipeline, host=host, port=port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    if on_bound is not None:
        on_bound(server.port)
    try:
        await stopping.wait()
    finally:
        await server.stop()
