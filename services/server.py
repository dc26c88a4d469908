"""Build and run one stage's gRPC server: health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from grpc_health.v1 import health_pb2

from omnistage import shm
from omnistage.server import GrpcServer, serve_until_signalled
from omnistage.server.metrics import metrics_endpoint
from omnistage.server.tracing import setup_tracing, shutdown_tracing
from omnistage.v1 import stage_pb2, stage_pb2_grpc
from services.admission import InflightLimiter
from services.config import StageConfig
from services.engines.base import Engine
from services.metrics import StageMetrics
from services.profiling.sessions import ProfileSessionStore
from services.servicer import StageServicer
from services.shared_memory import StageSharedMemory
from services.watchdog import EngineWatchdog

logger = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05
"""How often a draining stage looks whether it is idle."""
STAGE_SERVICE = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name


def create_engine(config: StageConfig) -> Engine:
    """The engine adapter for `config.engine`; imports stay lazy so each is optional."""
    if config.engine == "vllm":
        from services.engines.vllm_engine import VllmEngine

        return VllmEngine(config)
    if config.engine == "torch":
        from services.engines.torch_engine import TorchEngine

        return TorchEngine(config)
    raise NotImplementedError(f"engine {config.engine!r} is not available in this build")


class StageServer:
    """One stage: a grpc.aio server, its health service and its engine."""

    def __init__(self, config: StageConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self._grpc = GrpcServer(
            STAGE_SERVICE, security=config.security, on_unavailable=self._mark_not_serving
        )
        self.server, self.health = self._grpc.server, self._grpc.health
        root = config.profiler.directory if config.profiler.enabled else None
        self.sessions = ProfileSessionStore(
            stage_name=config.name,
            engine=engine,
            root=root,
            retention=config.profile_retention,
        )
        limiter = self._limiter = InflightLimiter(config.name, config.max_inflight)
        self.metrics = self._metrics(limiter)
        servicer = self._servicer = StageServicer(
            name=config.name,
            engine=engine,
            sessions=self.sessions,
            limiter=limiter,
            metrics=self.metrics,
            max_prompt_bytes=config.max_prompt_bytes,
            shared_memory=StageSharedMemory(enabled=config.shared_memory),
        )
        self._watch: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._watchdog: EngineWatchdog | None = None
        stage_pb2_grpc.add_StageServicer_to_server(servicer, self.server)
        self.port, self.health_port = self._grpc.bind_ports(
            config.host, config.port, config.health_port
        )
        self.metrics_endpoint = metrics_endpoint(
            self.metrics.registry if self.metrics else None,
            host=config.host,
            port=config.metrics_port,
        )
        self.metrics_port = self.metrics_endpoint.port if self.metrics_endpoint else None

    def _metrics(self, limiter: InflightLimiter) -> StageMetrics | None:
        """The stage's metrics when --metrics-port is given; None records nothing."""
        if self.config.metrics_port is None:
            return None
        metrics = StageMetrics(
            stage=self.config.name,
            engine=self.config.engine,
            running=lambda: limiter.inflight,
            profiling=lambda: 1 if self.sessions.active_session_id else 0,
        )
        observe_steps = getattr(self.engine, "observe_steps", None)
        if observe_steps is not None:
            observe_steps(metrics.step)
        return metrics

    def _mark_not_serving(self) -> None:
        asyncio.get_running_loop().create_task(
            self._grpc.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        )

    async def _watch_engine(self) -> None:
        """Poll the engine's liveness every health interval; once it has died, report
        NOT_SERVING for good (the orchestrator then routes around this replica)."""
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                reason = self.engine.info().dead_reason
            except Exception as exc:  # noqa: BLE001 - an engine that cannot say is not serving
                reason = f"the engine could not describe itself: {exc!r}"
            if reason:
                logger.error("stage %r: NOT_SERVING: %s", self.config.name, reason)
                await self._grpc.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                return

    async def start(self) -> None:
        """Prune old profile sessions, serve with health NOT_SERVING, load the engine, then
        report SERVING and watch that the engine stays alive."""
        await self.sessions.prune()
        self._sweeper = asyncio.create_task(shm.sweep_forever(), name="shm-sweeper")
        await self._grpc.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._grpc.start()
        started = time.monotonic()
        self._watchdog = EngineWatchdog.start()  # before the engine starts its processes
        await self.engine.start()
        await self._grpc.set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watch = asyncio.create_task(self._watch_engine(), name="engine-watch")
        logger.info(
            "stage %r SERVING on port %d (engine ready in %.1f s)",
            self.config.name,
            self.port,
            time.monotonic() - started,
        )

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, drain within the grace period, then close (`drain`)."""
        grace = self.config.grace_seconds if grace is None else grace
        for task in (self._watch, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            await self.health.enter_graceful_shutdown()
            await self.drain(grace)
            await self.sessions.abandon()
        finally:
            self.sessions.close()
            await self.engine.close()
            if self._watchdog is not None:
                await self._watchdog.close()
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.close()

    async def drain(self, grace: float) -> None:
        """Refuse new Generate and StartProfile calls, but keep serving until the stage is
        idle or `grace` seconds have passed: in-flight streams finish, a StopProfile under
        way finishes, and the files of a manifest handed out within the grace period are
        served until each has been fetched whole. Then stop the gRPC server, cutting what is
        still in flight."""
        started = time.monotonic()
        deadline = started + grace
        self._servicer.draining = True
        logger.info("draining stage %r for up to %.0f s", self.config.name, grace)
        while time.monotonic() < deadline and (
            self._limiter.inflight or self.sessions.busy(since=started - grace)
        ):
            await asyncio.sleep(DRAIN_POLL_S)
        await self._grpc.stop(max(0.0, deadline - time.monotonic()))


async def build_server(config: StageConfig) -> tuple[StageServer, int]:
    """A stage server bound to `config.port` (0 picks a free one), not yet started."""
    server = StageServer(config, create_engine(config))
    return server, server.port


async def serve(config: StageConfig, *, on_bound: Callable[[int], None] | None = None) -> None:
    """Run a stage until SIGTERM or SIGINT, then shut it down gracefully. Spans go over
    OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set (omnistage.server.tracing)."""
    setup_tracing(f"omnistage-stage-{config.name}")
    try:
        stage, port = await build_server(config)
        if on_bound is not None:
            on_bound(port)
        await serve_until_signalled(stage.start, stage.stop)
    finally:
        shutdown_tracing()
