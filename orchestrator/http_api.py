"""The orchestrator's OpenAI-compatible HTTP API: /v1/models, /health, /v1/chat/completions
and /v1/completions (whole, or streamed as server-sent events), beside the profiling
endpoints of `orchestrator.http_profile`. Routes only translate: the runner runs the pipeline
and the shared rules check the request, as on gRPC."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from omnistage.errors import NotFoundError, OmnistageError
from omnistage.security import ServerSecurity
from orchestrator.config import PipelineConfig
from orchestrator.http_errors import EXCEPTION_HANDLERS, TokenCheck, error_body
from orchestrator.http_openai import ChatCompletionRequest, CompletionRequest, pipeline_request
from orchestrator.http_profile import add_profile_routes
from orchestrator.http_replies import Kind, PipelineReply, ReplyShape, sse
from orchestrator.http_server import HttpApiConfig
from orchestrator.pool import SERVING, StagePool
from orchestrator.profiling import PipelineProfiler
from orchestrator.runner import PipelineRunner, StageEvent
from orchestrator.sessions import CollectedSessions
from orchestrator.stage_call import aclose, closing

logger = logging.getLogger(__name__)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class FrontDoor:
    """What the HTTP routes work with: the orchestrator's own parts."""

    pipeline: PipelineConfig
    pool: StagePool
    runner: PipelineRunner
    profiler: PipelineProfiler
    sessions: CollectedSessions
    config: HttpApiConfig
    security: ServerSecurity
    is_serving: Callable[[], bool]
    created: int = field(default_factory=lambda: int(time.time()))
    _text_stage: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.tokens = TokenCheck(self.security)
        self._text_stage = self.config.text_stage

    @property
    def model(self) -> str:
        return self.config.served_model_name or self.pipeline.name

    def check_model(self, model: str) -> None:
        if model != self.model:
            raise NotFoundError(
                f"model {model!r} is not served here; this server serves {self.model!r} "
                "(GET /v1/models)"
            )

    async def text_stage(self) -> str:
        """The stage whose text answers: the one configured, else the last stage whose
        engine is not a torch one (asked once by GetInfo; a stage that cannot be asked now
        counts as one that makes text, and is asked again next time)."""
        if self._text_stage is not None:
            return self._text_stage
        names = self.pipeline.stage_names
        kinds = await asyncio.gather(*(self._engine(name) for name in names))
        makes_text = [n for n, kind in zip(names, kinds, strict=True) if kind != "torch"]
        chosen = makes_text[-1] if makes_text else names[-1]
        if all(kinds):
            self._text_stage = chosen
            logger.info("HTTP API: the answer's text comes from stage %r", chosen)
        return chosen

    async def _engine(self, stage: str) -> str:
        for replica in self.pool.replicas(stage):
            if replica.health == SERVING:
                try:
                    return (await replica.client.info(timeout=5)).engine.engine
                except OmnistageError:
                    continue
        return ""

    def guard(self, group: str) -> Any:
        """A route dependency: the token check of `group`, before the body is read."""

        async def check(request: Request) -> None:  # async: FastAPI runs a sync one in a thread
            self.tokens.check(request, group)

        return Depends(check)


def build_app(door: FrontDoor) -> FastAPI:
    """The FastAPI app of one orchestrator."""
    app = FastAPI(
        title=f"omnistage: {door.pipeline.name}",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        exception_handlers=dict(EXCEPTION_HANDLERS),
    )
    inference = [door.guard("inference")]

    @app.get("/health")
    async def health() -> Response:
        serving = door.is_serving()
        return JSONResponse(
            {"status": "SERVING" if serving else "NOT_SERVING"},
            status_code=200 if serving else 503,
        )

    @app.get("/v1/models", dependencies=inference)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(door)]}

    @app.get("/v1/models/{model:path}", dependencies=inference)
    async def model(model: str) -> dict[str, Any]:
        door.check_model(model)
        return _model_card(door)

    @app.post("/v1/chat/completions", dependencies=inference)
    async def chat(body: ChatCompletionRequest) -> Response:
        return await complete(door, body, "chat")

    @app.post("/v1/completions", dependencies=inference)
    async def completions(body: CompletionRequest) -> Response:
        return await complete(door, body, "completion")

    add_profile_routes(app, door)
    return app


def _model_card(door: FrontDoor) -> dict[str, Any]:
    return {
        "id": door.model,
        "object": "model",
        "created": door.created,
        "owned_by": "omnistage",
        "root": door.pipeline.name,
        "stages": door.pipeline.stage_names,
    }


async def complete(
    door: FrontDoor, body: ChatCompletionRequest | CompletionRequest, kind: Kind
) -> Response:
    """Run the pipeline for one OpenAI request; the whole reply, or a stream of chunks."""
    door.check_model(body.model)
    request, overrides = pipeline_request(body)
    door.runner.check_stage_sampling(overrides)
    shape = ReplyShape(
        kind=kind,
        model=door.model,
        request_id=request.request_id,
        text_stage=await door.text_stage(),
        final_stage=door.pipeline.stage_names[-1],
        sample_rate=door.config.sample_rate,
    )
    reply = PipelineReply(shape)
    # The reply reads the text stage's deltas and the final stage's; every other stage that
    # feeds a waiting stage sends its whole output at once.
    read = {shape.text_stage, shape.final_stage}
    events = door.runner.run(request, stage_sampling=overrides, read=read)
    if not body.stream:
        async with closing(events):
            async for event in events:
                reply.add(event)
        return JSONResponse(reply.whole())
    try:
        # The first output before the status line: a pipeline that fails at once (a stage
        # down, a stage's INVALID_ARGUMENT) answers with its HTTP status, not a broken stream.
        first = await anext(events, None)
    except BaseException:
        await aclose(events)
        raise
    usage = body.stream_options is not None and body.stream_options.include_usage
    stream = _stream(reply, first, events, include_usage=usage)
    return StreamingResponse(stream, media_type="text/event-stream", headers=STREAM_HEADERS)


async def _stream(
    reply: PipelineReply,
    first: StageEvent | None,
    events: AsyncIterator[StageEvent],
    *,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The chunks of a streamed reply, then `data: [DONE]`. A client that goes away
    cancels this generator, and closing the runner's events cancels every stage's call."""
    chat = reply.shape.kind == "chat"
    async with closing(events):
        try:
            if chat:
                yield sse(reply.chunk({"role": "assistant", "content": ""}))
            event: StageEvent | None = first
            while event is not None:
                for piece in reply.add(event):
                    if chat or "content" in piece:
                        yield sse(reply.chunk(piece))
                event = await anext(events, None)
        except OmnistageError as exc:  # after the status line: the error is the last event
            logger.info("request %s failed mid-stream: %s", reply.shape.request_id, exc)
            yield sse(error_body(exc))
            yield sse("[DONE]")
            return
        except asyncio.CancelledError:
            logger.info(
                "request %s: the HTTP client went away; cancelling the pipeline request",
                reply.shape.request_id,
            )
            raise
    yield sse(reply.chunk(finish_reason=reply.finish_reason))
    if include_usage:
        yield sse(reply.usage_chunk())
    yield sse("[DONE]")
