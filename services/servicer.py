"""The Stage servicer: unpack the message, await the engine, pack the reply. Nothing more."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from omnistage import __version__
from omnistage.convert import (
    delta_to_pb,
    generate_input_from_pb,
    manifest_to_pb,
    profile_options_from_pb,
    stage_description_to_pb,
)
from omnistage.types import StageDescription
from omnistage.v1 import common_pb2, stage_pb2, stage_pb2_grpc
from services.admission import InflightLimiter
from services.config import DEFAULT_MAX_INFLIGHT
from services.engines.base import Engine
from services.profiling.sessions import ProfileSessionStore
from services.status import grpc_errors
from services.validation import validate_generate_input

logger = logging.getLogger(__name__)


class StageServicer(stage_pb2_grpc.StageServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        name: str,
        engine: Engine,
        sessions: ProfileSessionStore,
        on_engine_dead: Callable[[], None],
        limiter: InflightLimiter | None = None,
    ) -> None:
        self._name = name
        self._engine = engine
        self._sessions = sessions
        self._on_engine_dead = on_engine_dead
        self._limiter = limiter or InflightLimiter(name, DEFAULT_MAX_INFLIGHT)

    async def Generate(
        self, request: stage_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.GenerateResponse]:
        async with grpc_errors(context, "Generate", on_engine_dead=self._on_engine_dead):
            generate_input = generate_input_from_pb(request)
            validate_generate_input(generate_input)
            with self._limiter.admit():
                try:
                    async for delta in self._engine.generate(generate_input):
                        yield delta_to_pb(delta)
                except asyncio.CancelledError:
                    logger.info("request %s cancelled by the client", generate_input.request_id)
                    await self._engine.abort(generate_input.request_id)
                    raise

    async def StartProfile(
        self, request: stage_pb2.StartProfileRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.StartProfileResponse:
        async with grpc_errors(context, "StartProfile", on_engine_dead=self._on_engine_dead):
            session_dir = await self._sessions.start(profile_options_from_pb(request))
            return stage_pb2.StartProfileResponse(
                session_id=session_dir.name, profile_dir=str(session_dir)
            )
        raise AssertionError("unreachable")  # grpc_errors aborts

    async def StopProfile(
        self, request: stage_pb2.StopProfileRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.StopProfileResponse:
        async with grpc_errors(context, "StopProfile", on_engine_dead=self._on_engine_dead):
            return manifest_to_pb(await self._sessions.stop())
        raise AssertionError("unreachable")

    async def FetchProfileFile(
        self, request: stage_pb2.FetchProfileFileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.FileChunk]:
        async with grpc_errors(context, "FetchProfileFile"):
            chunks = self._sessions.read_chunks(
                request.session_id,
                request.name,
                chunk_size=request.chunk_size,
                offset=request.offset,
            )
            async for offset, data, total in chunks:
                yield common_pb2.FileChunk(data=data, offset=offset, total_size=total)

    async def GetInfo(
        self, request: stage_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.StageInfo:
        async with grpc_errors(context, "GetInfo"):
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
            )
            return stage_description_to_pb(description)
        raise AssertionError("unreachable")
