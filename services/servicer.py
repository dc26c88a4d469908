"""The Stage servicer: unpack the message, await the engine, pack the reply. Nothing more."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from omnistage import __version__
from omnistage.convert import (
    generate_input_from_pb,
    manifest_to_pb,
    profile_options_from_pb,
    sampling_from_pb,
    stage_description_to_pb,
)
from omnistage.convert_sessions import file_chunks_to_pb
from omnistage.errors import StageDrainingError
from omnistage.server import Context
from omnistage.server.observe import ObservedCall, RequestObserver
from omnistage.server.request_ids import InflightRequestIds
from omnistage.types import OutputDelta, StageDescription
from omnistage.v1 import common_pb2, stage_pb2, stage_pb2_grpc
from omnistage.validation import (
    DEFAULT_MAX_PROMPT_BYTES,
    check_prompt_bytes,
    validate_generate_input,
    validate_sampling,
)
from services.admission import InflightLimiter
from services.config import DEFAULT_MAX_INFLIGHT
from services.engines.base import Engine
from services.metrics import StageMetrics
from services.profiling.sessions import ProfileSessionStore
from services.shared_memory import StageSharedMemory

logger = logging.getLogger(__name__)

GENERATE_SPAN = f"{stage_pb2.DESCRIPTOR.services_by_name['Stage'].full_name}/Generate"


class StageServicer(stage_pb2_grpc.StageServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        name: str,
        engine: Engine,
        sessions: ProfileSessionStore,
        limiter: InflightLimiter | None = None,
        metrics: StageMetrics | None = None,
        max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
        shared_memory: StageSharedMemory | None = None,
    ) -> None:
        self._name = name
        self._shm = shared_memory or StageSharedMemory(enabled=False)
        self._max_prompt_bytes = max_prompt_bytes
        self._request_ids = InflightRequestIds(f"stage {name!r}")
        self._engine = engine
        self._sessions = sessions
        self._limiter = limiter or InflightLimiter(name, DEFAULT_MAX_INFLIGHT)
        self._metrics = metrics
        self.draining = False
        """Set on SIGTERM: Generate and StartProfile are refused, profile files still served."""
        self._observer = RequestObserver(
            metrics.requests if metrics is not None else None,
            span_name=GENERATE_SPAN,
            attributes={"omnistage.stage": name},
        )

    async def Generate(
        self, request: stage_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[stage_pb2.GenerateResponse]:
        session = self._sessions.active_session_id
        with self._observer.observe(context, profile_session_id=session) as call:
            generate_input = generate_input_from_pb(request)
            call.annotate(request_id=generate_input.request_id)
            generate_input = self._shm.input(request, generate_input)
            validate_generate_input(generate_input)
            self._refuse_when_draining("Generate")
            check_prompt_bytes(
                generate_input,
                max_bytes=self._max_prompt_bytes,
                where=f"stage {self._name!r}",
                flag="--max-prompt-bytes",
            )
            with self._request_ids.hold(generate_input.request_id), self._limiter.admit():
                deltas = self._engine.generate(generate_input)
                responses = self._shm.responses(request, deltas)
                try:
                    async with contextlib.aclosing(responses):
                        async for delta, message in responses:
                            call.output()
                            if delta.finished:
                                self._finished(call, delta)
                            yield message
                except asyncio.CancelledError:
                    logger.info("request %s cancelled by the client", generate_input.request_id)
                    await self._engine.abort(generate_input.request_id)
                    raise

    def _refuse_when_draining(self, rpc: str) -> None:
        if self.draining:
            raise StageDrainingError(
                f"stage {self._name!r} is draining (it got SIGTERM): it takes no new {rpc}; "
                "send it to another replica, or retry once the stage is back"
            )

    def _finished(self, call: ObservedCall, delta: OutputDelta) -> None:
        """The last delta of a call: its queue time (metrics), tokens and finish (span)."""
        if self._metrics is not None:
            self._metrics.finished(delta)
        call.annotate(finish_reason=delta.finish_reason)
        if delta.metrics is not None:
            call.annotate(
                prompt_tokens=delta.metrics.prompt_tokens,
                generated_tokens=delta.metrics.generated_tokens,
            )

    async def StartProfile(
        self, request: stage_pb2.StartProfileRequest, context: Context
    ) -> stage_pb2.StartProfileResponse:
        self._refuse_when_draining("StartProfile")
        session_dir = await self._sessions.start(profile_options_from_pb(request))
        return stage_pb2.StartProfileResponse(
            session_id=session_dir.name, profile_dir=str(session_dir)
        )

    async def StopProfile(
        self, request: stage_pb2.StopProfileRequest, context: Context
    ) -> stage_pb2.StopProfileResponse:
        return manifest_to_pb(await self._sessions.stop())

    async def FetchProfileFile(
        self,
        request: stage_pb2.FetchProfileFileRequest,
        context: Context,
    ) -> AsyncIterator[common_pb2.FileChunk]:
        async for chunk in file_chunks_to_pb(self._sessions.read_chunks, request):
            yield chunk

    async def ValidateSampling(
        self, request: stage_pb2.ValidateSamplingRequest, context: Context
    ) -> stage_pb2.ValidateSamplingResponse:
        options = sampling_from_pb(request.sampling)
        validate_sampling(options)
        self._engine.check_sampling(options)
        return stage_pb2.ValidateSamplingResponse()

    async def GetInfo(
        self, request: stage_pb2.GetInfoRequest, context: Context
    ) -> stage_pb2.StageInfo:
        root = self._sessions.root
        description = StageDescription(
            name=self._name,
            engine=self._engine.info(),
            profiling_enabled=self._sessions.enabled,
            profiling_active=bool(self._sessions.active_session_id),
            profile_session_id=self._sessions.active_session_id,
            server_time_unix_ns=time.time_ns(),
            version=__version__,
            profiler_dir=str(root) if root is not None else "",
            shm_domain=self._shm.domain,
        )
        return stage_description_to_pb(description)
