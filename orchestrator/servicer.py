"""The Orchestrator servicer: unpack, await the runner or the profiler, pack the reply."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from omnistage.convert import (
    delta_to_pb,
    generate_input_from_pb,
    pipeline_status_to_pb,
    profile_options_from_pb,
    report_to_pb,
    sampling_from_pb,
)
from omnistage.convert_sessions import file_chunks_to_pb, progress_to_pb, session_list_to_pb
from omnistage.errors import InvalidRequestError, OmnistageError
from omnistage.server import Context
from omnistage.server.metrics import RequestMeter
from omnistage.server.observe import RequestObserver
from omnistage.traces.slimming import VLLM_IDLE_PATTERNS, SlimOptions
from omnistage.types import PipelineStatus, StageStatus, StopProgress
from omnistage.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from omnistage.validation import validate_generate_input
from orchestrator.config import PipelineConfig
from orchestrator.pool import StagePool
from orchestrator.profiling import PipelineProfiler
from orchestrator.runner import PipelineRunner, StageEvent
from orchestrator.sessions import CollectedSessions

PROGRESS_QUEUE = 256  # progress events waiting for a slow caller
GENERATE_SPAN = f"{orchestrator_pb2.DESCRIPTOR.services_by_name['Orchestrator'].full_name}/Generate"


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        pipeline: PipelineConfig,
        pool: StagePool,
        runner: PipelineRunner,
        profiler: PipelineProfiler,
        sessions: CollectedSessions,
        meter: RequestMeter | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._pool = pool
        self._runner = runner
        self._profiler = profiler
        self._sessions = sessions
        self._observer = RequestObserver(meter, span_name=GENERATE_SPAN)
        self._last = len(pipeline.stages) - 1

    async def Generate(
        self, request: orchestrator_pb2.PipelineRequest, context: Context
    ) -> AsyncIterator[orchestrator_pb2.PipelineResponse]:
        session = self._profiler.active_session_id
        with self._observer.observe(context, profile_session_id=session) as call:
            generate_input = generate_input_from_pb(request)
            call.annotate(request_id=generate_input.request_id)
            validate_generate_input(generate_input)
            overrides = {k: sampling_from_pb(v) for k, v in request.stage_sampling.items()}
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            events = self._runner.run(generate_input, stage_sampling=overrides, deadline=deadline)
            async for event in events:
                if event.stage_index == self._last:
                    call.output()  # the time to first output is the final stage's
                    if event.delta.finished:
                        call.annotate(finish_reason=event.delta.finish_reason)
                yield _event_to_pb(event)

    async def StartProfile(
        self,
        request: orchestrator_pb2.PipelineStartProfileRequest,
        context: Context,
    ) -> orchestrator_pb2.PipelineStartProfileResponse:
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

    async def StopProfile(
        self,
        request: orchestrator_pb2.PipelineStopProfileRequest,
        context: Context,
    ) -> orchestrator_pb2.ProfileReport:
        report = await self._profiler.stop(
            list(request.stages), request.output_dir, slim=_slim(request)
        )
        return report_to_pb(report)

    async def StopProfileStream(
        self,
        request: orchestrator_pb2.PipelineStopProfileRequest,
        context: Context,
    ) -> AsyncIterator[orchestrator_pb2.StopProfileProgress]:
        events: asyncio.Queue[StopProgress] = asyncio.Queue(PROGRESS_QUEUE)

        def progress(event: StopProgress) -> None:
            # Byte counts are coalesced when the caller reads slower than the pulls run;
            # phase changes are few (a handful per stage) and always kept.
            if event.phase == "pulling" and events.qsize() >= PROGRESS_QUEUE // 2:
                return
            with contextlib.suppress(asyncio.QueueFull):
                events.put_nowait(event)

        stop = asyncio.ensure_future(
            self._profiler.stop(
                list(request.stages), request.output_dir, slim=_slim(request), progress=progress
            )
        )
        try:
            while not stop.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait([getter, stop], return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield progress_to_pb(getter.result())
                else:
                    getter.cancel()
            report = stop.result()
        finally:
            stop.cancel()  # the profiler finishes the stop on its own; see its `stop`
        done = StopProgress(phase="done", message="session collected", report=report)
        yield progress_to_pb(done)

    async def ListSessions(
        self,
        request: orchestrator_pb2.ListSessionsRequest,
        context: Context,
    ) -> orchestrator_pb2.SessionList:
        return session_list_to_pb(await self._sessions.listing())

    async def FetchSessionFile(
        self,
        request: orchestrator_pb2.FetchSessionFileRequest,
        context: Context,
    ) -> AsyncIterator[common_pb2.FileChunk]:
        async for chunk in file_chunks_to_pb(self._sessions.read_chunks, request):
            yield chunk

    async def DeleteSession(
        self,
        request: orchestrator_pb2.DeleteSessionRequest,
        context: Context,
    ) -> orchestrator_pb2.DeleteSessionResponse:
        freed = await self._sessions.delete(
            request.session_id, active=self._profiler.active_session_id
        )
        return orchestrator_pb2.DeleteSessionResponse(
            session_id=request.session_id, bytes_freed=freed
        )

    async def GetPipeline(
        self, request: orchestrator_pb2.GetPipelineRequest, context: Context
    ) -> orchestrator_pb2.PipelineInfo:
        await self._pool.refresh()
        profiling = set(await self._profiler.check_stages())
        stages = [
            await self._stage_status(index, spec.name, spec.name in profiling)
            for index, spec in enumerate(self._pipeline.stages)
        ]
        status = PipelineStatus(
            name=self._pipeline.name,
            stages=tuple(stages),
            profiling_active=bool(profiling),
            profile_session_id=self._profiler.active_session_id,
        )
        return pipeline_status_to_pb(status)

    async def _stage_status(self, index: int, name: str, profiling: bool) -> StageStatus:
        """A stage's replicas and health; its engine and model from a serving replica."""
        replicas = self._pool.replicas(name)
        healths = [r.health for r in replicas]
        engine = model = ""
        error = "" if replicas else self._pool.describe_unready(name)
        if "SERVING" in healths:
            try:
                info = await replicas[healths.index("SERVING")].client.info(timeout=5)
                engine, model = info.engine.engine, info.engine.model
            except OmnistageError as exc:  # reported, not raised
                error = str(exc)
        return StageStatus(
            name=name,
            index=index,
            addresses=tuple(r.address for r in replicas),
            health=",".join(healths),
            profiling_active=profiling,
            engine=engine,
            model=model,
            error=error,
        )


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


def _slim(request: orchestrator_pb2.PipelineStopProfileRequest) -> SlimOptions | None:
    if request.slim or request.slim_min_duration_us or request.slim_patterns:
        return slim_options(request.slim_min_duration_us, list(request.slim_patterns))
    return None


def slim_options(min_duration_us: float, patterns: list[str]) -> SlimOptions:
    """Slimming as asked for; no patterns means vLLM's known idle loops."""
    try:
        return SlimOptions(
            min_duration_us=min_duration_us, drop_patterns=tuple(patterns) or VLLM_IDLE_PATTERNS
        )
    except ValueError as exc:
        raise InvalidRequestError(f"slimming: {exc}") from exc
