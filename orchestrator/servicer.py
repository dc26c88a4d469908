"""The Orchestrator servicer: unpack, await the runner or the profiler, pack the reply."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from omnistage.convert import (
    delta_to_pb,
    generate_input_from_pb,
    profile_options_from_pb,
    report_to_pb,
    sampling_from_pb,
)
from omnistage.errors import InvalidRequestError
from omnistage.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.config import PipelineConfig
from orchestrator.pool import StagePool
from orchestrator.profiling import PipelineProfiler
from orchestrator.runner import PipelineRunner, StageEvent
from orchestrator.slimming import VLLM_IDLE_PATTERNS, SlimOptions
from services.status import grpc_errors
from services.validation import validate_generate_input


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        pipeline: PipelineConfig,
        pool: StagePool,
        runner: PipelineRunner,
        profiler: PipelineProfiler,
    ) -> None:
        self._pipeline = pipeline
        self._pool = pool
        self._runner = runner
        self._profiler = profiler

    async def Generate(
        self, request: orchestrator_pb2.PipelineRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.PipelineResponse]:
        async with grpc_errors(context, "Generate"):
            generate_input = generate_input_from_pb(request)
            validate_generate_input(generate_input)
            overrides = {k: sampling_from_pb(v) for k, v in request.stage_sampling.items()}
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            events = self._runner.run(generate_input, stage_sampling=overrides, deadline=deadline)
            async for event in events:
                yield _event_to_pb(event)

    async def StartProfile(
        self,
        request: orchestrator_pb2.PipelineStartProfileRequest,
        context: grpc.aio.ServicerContext,
    ) -> orchestrator_pb2.PipelineStartProfileResponse:
        async with grpc_errors(context, "StartProfile"):
            session_id, started = await self._profiler.start(
                list(request.stages), profile_options_from_pb(request)
            )
            return orchestrator_pb2.PipelineStartProfileResponse(
                session_id=session_id,
                stages=[
                    orchestrator_pb2.StageProfileStart(stage=name, session_id=sid)
                    for name, sids in started.items()
                    for sid in sids
                ],
            )
        raise AssertionError("unreachable")

    async def StopProfile(
        self,
        request: orchestrator_pb2.PipelineStopProfileRequest,
        context: grpc.aio.ServicerContext,
    ) -> orchestrator_pb2.ProfileReport:
        async with grpc_errors(context, "StopProfile"):
            slim = None
            if request.slim or request.slim_min_duration_us or request.slim_patterns:
                slim = slim_options(request.slim_min_duration_us, list(request.slim_patterns))
            report = await self._profiler.stop(list(request.stages), request.output_dir, slim=slim)
            return report_to_pb(report)
        raise AssertionError("unreachable")

    async def GetPipeline(
        self, request: orchestrator_pb2.GetPipelineRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.PipelineInfo:
        async with grpc_errors(context, "GetPipeline"):
            profiling = set(self._profiler.profiling_stages())
            stages = []
            await self._pool.refresh()
            for index, spec in enumerate(self._pipeline.stages):
                replicas = self._pool.replicas(spec.name)
                healths = [r.health for r in replicas]
                status = orchestrator_pb2.StageStatus(
                    name=spec.name,
                    index=index,
                    addresses=[r.address for r in replicas],
                    health=",".join(healths),
                    profiling_active=spec.name in profiling,
                )
                if not replicas:
                    status.error = self._pool.describe_unready(spec.name)
                if "SERVING" in healths:
                    try:
                        info = await replicas[healths.index("SERVING")].client.info(timeout=5)
                        status.engine, status.model = info.engine, info.model
                    except Exception as exc:  # noqa: BLE001 - reported, not raised
                        status.error = str(exc)
                stages.append(status)
            return orchestrator_pb2.PipelineInfo(
                name=self._pipeline.name,
                stages=stages,
                profiling_active=bool(profiling),
                profile_session_id=self._profiler.active_session_id,
            )
        raise AssertionError("unreachable")


def _event_to_pb(event: StageEvent) -> orchestrator_pb2.PipelineResponse:
    delta = delta_to_pb(event.delta)
    msg = orchestrator_pb2.PipelineResponse(
        stage=event.stage,
        stage_index=event.stage_index,
        request_id=event.request_id,
        text=delta.text,
        token_ids=delta.token_ids,
        finished=delta.finished,
        final=event.final,
        finish_reason=delta.finish_reason,
        replica=event.replica,
    )
    if delta.HasField("tensor"):
        msg.tensor.CopyFrom(delta.tensor)
    if event.timing is not None:
        msg.metrics.CopyFrom(
            orchestrator_pb2.StageMetrics(
                queue_time_s=event.timing.queue_time_s,
                time_to_first_output_s=event.timing.time_to_first_output_s,
                duration_s=event.timing.duration_s,
                handoff_s=event.timing.handoff_s,
                stage_time_s=event.timing.stage_time_s,
            )
        )
    return msg


def slim_options(min_duration_us: float, patterns: list[str]) -> SlimOptions:
    """Slimming as asked for; no patterns means vLLM's known idle loops."""
    try:
        return SlimOptions(
            min_duration_us=min_duration_us, drop_patterns=tuple(patterns) or VLLM_IDLE_PATTERNS
        )
    except ValueError as exc:
        raise InvalidRequestError(f"slimming: {exc}") from exc
