"""Build and run the orchestrator's gRPC server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from grpc_health.v1 import health_pb2
from pydantic import BaseModel, ConfigDict, Field

from omnistage import shm, shm_session
from omnistage.security import ServerSecurity
from omnistage.server import GrpcServer, serve_until_signalled
from omnistage.server.metrics import metrics_endpoint
from omnistage.server.tracing import setup_tracing, shutdown_tracing
from omnistage.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from omnistage.validation import DEFAULT_MAX_PROMPT_BYTES
from orchestrator.config import PipelineConfig
from orchestrator.http_server import HttpApiConfig, HttpServer
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.pool import StagePool
from orchestrator.profiling import PipelineProfiler
from orchestrator.runner import PipelineRunner, StageEvent
from orchestrator.servicer import OrchestratorServicer
from orchestrator.sessions import CollectedSessions

logger = logging.getLogger(__name__)

ORCHESTRATOR_SERVICE = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name


class OrchestratorServerConfig(BaseModel):
    """Where and how the orchestrator listens; the pipeline file says what it serves."""

    model_config = ConfigDict(extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(default=50050, ge=0, le=65535, description="0 picks a free port.")
    health_port: int | None = Field(
        default=None, ge=0, le=65535, description="An extra plaintext port for health only."
    )
    security: ServerSecurity = Field(
        default_factory=ServerSecurity, description="TLS, mTLS and the bearer token."
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Serve Prometheus' /metrics here; None: off."
    )
    grace_seconds: float = Field(default=30.0, ge=0, description="SIGTERM drain time.")
    max_prompt_bytes: int = Field(
        default=DEFAULT_MAX_PROMPT_BYTES,
        ge=0,
        description="UTF-8 bytes of a request's text taken; more is INVALID_ARGUMENT. 0: none.",
    )
    profile_dir: Path | None = Field(
        default=None, description="The profile root; None: the pipeline's launch.profile_dir."
    )
    profile_max_sessions: int | None = Field(
        default=None, ge=0, description="Sessions kept; None: the pipeline's, 0: all."
    )
    profile_max_bytes: int | None = Field(
        default=None, ge=0, description="Bytes kept; None: the pipeline's, 0: no limit."
    )
    http: HttpApiConfig | None = Field(
        default=None, description="The OpenAI-compatible HTTP API; None: no HTTP port."
    )


class OrchestratorServer:
    """The orchestrator: a grpc.aio server, its health service and its stage clients."""

    def __init__(self, pipeline: PipelineConfig, config: OrchestratorServerConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        self.pool = StagePool(pipeline)
        self.sessions = CollectedSessions(
            pipeline.session_store(
                profile_dir=config.profile_dir,
                max_sessions=config.profile_max_sessions,
                max_bytes=config.profile_max_bytes,
            )
        )
        self.metrics = (
            None
            if config.metrics_port is None
            else OrchestratorMetrics(
                pool=self.pool, profiling=lambda: 1 if self.profiler.active_session_id else 0
            )
        )
        self.profiler = PipelineProfiler(
            pipeline,
            self.pool,
            sessions=self.sessions,
            on_stopped=self.metrics.profile_stopped if self.metrics else None,
        )
        self._grpc = GrpcServer(ORCHESTRATOR_SERVICE, security=config.security)
        self.server, self.health = self._grpc.server, self._grpc.health
        self.runner = PipelineRunner(
            pipeline,
            self.pool,
            on_stage_done=self._stage_done,
            max_prompt_bytes=config.max_prompt_bytes,
        )
        servicer = OrchestratorServicer(
            pipeline=pipeline,
            pool=self.pool,
            runner=self.runner,
            profiler=self.profiler,
            sessions=self.sessions,
            meter=self.metrics.requests if self.metrics else None,
        )
        orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(servicer, self.server)
        self.serving = False
        self._sweeper: asyncio.Task[None] | None = None
        self.http = None if config.http is None else self._http_server(config.http)
        self.port, self.health_port = self._grpc.bind_ports(
            config.host, config.port, config.health_port
        )
        self.metrics_endpoint = metrics_endpoint(
            self.metrics.registry if self.metrics else None,
            host=config.host,
            port=config.metrics_port,
        )

    def _stage_done(self, event: StageEvent) -> None:
        """A stage's share of a request: into the profile session (if any), and the metrics."""
        self.profiler.record(event)
        if self.metrics is not None:
            self.metrics.stage_done(event)

    def _http_server(self, http: HttpApiConfig) -> HttpServer:
        from orchestrator.http_api import FrontDoor, build_app

        if http.text_stage is not None:
            self.pipeline.stage_index(http.text_stage)  # a stage of this pipeline, or raise
        door = FrontDoor(
            pipeline=self.pipeline,
            pool=self.pool,
            runner=self.runner,
            profiler=self.profiler,
            sessions=self.sessions,
            config=http,
            security=self.config.security,
            is_serving=lambda: self.serving,
        )
        return HttpServer(
            build_app(door),
            self.config.host,
            http.port,
            security=self.config.security,
            grace=self.config.grace_seconds,
        )

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    async def start(self) -> None:
        self.sessions.root.mkdir(parents=True, exist_ok=True)
        await self.sessions.prune()
        retention = self.sessions.retention
        logger.info(
            "profile sessions go under %s (keeping at most %s sessions and %s bytes)",
            self.sessions.root,
            retention.max_sessions or "any number of",
            retention.max_total_bytes or "any number of",
        )
        await self.pool.start()
        self._sweeper = asyncio.create_task(_sweep_segments(), name="shm-sweeper")
        await self._grpc.start()
        if self.http is not None:
            await self.http.start()
        await self._grpc.set_health(health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        logger.info(
            "orchestrator for %r SERVING on port %d: %s",
            self.pipeline.name,
            self.port,
            " → ".join(s.name for s in self.pipeline.stages),
        )

    async def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_seconds if grace is None else grace
        self.serving = False
        try:
            await self.health.enter_graceful_shutdown()
            stops = [self._grpc.stop(grace)]
            if self.http is not None:
                stops.append(self.http.stop())
            await asyncio.gather(*stops)
        finally:
            if self._sweeper is not None:
                self._sweeper.cancel()
            if self.runner.segment_pool is not None:
                self.runner.segment_pool.close()
            await self.pool.close()
            self.sessions.close()
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.close()


async def _sweep_segments(interval: float = shm.SWEEP_INTERVAL_S) -> None:
    """Remove the shared-memory segments of dead processes (a previous orchestrator killed
    mid-request) and this one's of requests that have ended, now and every `interval`."""
    while True:
        await asyncio.to_thread(shm.sweep_dead_owners)
        await asyncio.to_thread(shm_session.sweep_finished)
        await asyncio.sleep(interval)


async def serve(
    pipeline: PipelineConfig,
    config: OrchestratorServerConfig,
    *,
    on_bound: Callable[[int], None] | None = None,
    on_http_bound: Callable[[int], None] | None = None,
) -> None:
    """Run the orchestrator until SIGTERM or SIGINT. Once it serves, `on_http_bound` gets
    the HTTP port (when it has one), then `on_bound` the gRPC port. Spans go over OTLP when
    OTEL_EXPORTER_OTLP_ENDPOINT is set (omnistage.server.tracing)."""
    setup_tracing("omnistage-orchestrator")
    try:
        server = OrchestratorServer(pipeline, config)

        def started() -> None:
            if on_http_bound is not None and server.http_port is not None:
                on_http_bound(server.http_port)
            if on_bound is not None:
                on_bound(server.port)

        await serve_until_signalled(server.start, server.stop, on_started=started)
    finally:
        shutdown_tracing()
