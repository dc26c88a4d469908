"""Streaming hand-off: a stage that starts on chunks of the previous stage's output.

With `input.stream_chunk: N` on stage K, every N new tokens of stage K-1 become one Generate
call on stage K, its input built by the edge's processor from a `StageOutput` holding those N
tokens alone (and the text that arrived with them); the last, shorter chunk goes when stage K-1
finishes. With `input.stream_first_chunk: M` too, the first chunk is M tokens (a small one
brings the first output sooner), and every later one N. Chunk n starts once chunk n -
STREAM_IN_FLIGHT has been sent on, so a few calls run ahead of the one streaming back. Stage
K's outputs reach the client in chunk order, and its `finished` comes once, after the last
chunk, carrying the whole stage's timing.

Stage K-1's events pass through as they arrive. When anything fails, or the caller goes away,
every chunk call and the upstream stream are cancelled, so every stage aborts its piece.

Every queue is bounded, so memory stays flat however long the output and however slow the
caller: at most STREAM_IN_FLIGHT chunks wait to be sent on (the upstream stream is read no
faster), each chunk call buffers at most CHUNK_QUEUE deltas (its gRPC stream is read no
faster), and at most EVENT_QUEUE events wait for the caller. None of them can deadlock: the
caller waits only on the event queue; the sender waits only on the chunk it is sending,
whose call waits only on chunks before it; the cutter waits only on the sender.

Only tokens and text are cut into chunks. A stage K-1 that sends tensors (a torch stage) fails
the request with FAILED_PRECONDITION rather than hand stage K empty chunks; the pipeline file
is refused at load already when its launch section says stage K-1 is a torch stage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from omnistage.errors import OmnistageError
from omnistage.traces.spans import ChunkSpan
from omnistage.types import GenerateInput, OutputDelta, RequestMetrics
from orchestrator.config import StageSpec
from orchestrator.pool import StagePool
from orchestrator.processors import StageOutput
from orchestrator.stage_call import StageEvent, StageTiming, call_stage, check_complete, closing

logger = logging.getLogger(__name__)

STREAM_IN_FLIGHT = 2
"""Chunk calls of one request that may run at once on a streamed stage."""
CHUNK_QUEUE = 16
"""Deltas of one chunk call buffered ahead of the sender (a few tensor chunks of 4 MiB)."""
EVENT_QUEUE = 16
"""Events of both stages buffered for the caller."""


class StreamedTensorError(OmnistageError):
    """A streamed hand-off got tensors from the previous stage; only tokens and text stream."""

    code = "FAILED_PRECONDITION"


class _Done:
    """Marks the end of the merged stream."""


@dataclass(eq=False)
class _Chunk:
    number: int
    stage_input: GenerateInput
    ready_at: float
    deltas: asyncio.Queue[tuple[OutputDelta, str] | None] = field(
        default_factory=lambda: asyncio.Queue(CHUNK_QUEUE)
    )
    emitted: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    cut_ns: int = 0  # wall clock, for the request's spans: cut, call started, outputs
    start_ns: int = 0
    first_ns: int = 0
    end_ns: int = 0
    metrics: RequestMetrics | None = None  # the stage's own, from the call's `finished`

    def span(self) -> ChunkSpan:
        own = self.metrics or RequestMetrics()
        return ChunkSpan(
            ready_unix_ns=self.cut_ns,
            start_unix_ns=self.start_ns,
            first_output_unix_ns=self.first_ns or self.end_ns,
            end_unix_ns=self.end_ns,
            stage_time_s=own.duration_s,
            stage_first_output_s=own.time_to_first_token_s,
            queue_time_s=own.queue_time_s,
        )


def _finish_reason(finishes: list[OutputDelta]) -> str:
    """The streamed stage's finish: "abort" when any chunk call was aborted (its output is
    then partial), else the last chunk's."""
    if any(d.finish_reason == "abort" for d in finishes):
        return "abort"
    return finishes[-1].finish_reason if finishes else ""


def _has_content(delta: OutputDelta) -> bool:
    return bool(delta.token_ids or delta.text or delta.tensor is not None)


class StreamedStage:
    """One request's pass through a streamed stage: `events(upstream)` yields both stages'."""

    def __init__(
        self,
        *,
        index: int,
        spec: StageSpec,
        upstream_stage: str,
        pool: StagePool,
        build_input: Callable[[StageOutput], GenerateInput],
        request_id: str,
        deadline: float | None,
        final: bool,
        on_done: Callable[[StageEvent], None] | None = None,
        in_flight: int = STREAM_IN_FLIGHT,
    ) -> None:
        if spec.input.stream_chunk is None:
            raise ValueError(f"stage {spec.name!r} has no input.stream_chunk")
        self._index = index
        self._spec = spec
        self._size = spec.input.stream_chunk
        self._first_size = spec.input.stream_first_chunk or self._size
        self._upstream_stage = upstream_stage
        self._pool = pool
        self._build_input = build_input
        self._request_id = request_id
        self._deadline = deadline
        self._final = final
        self._on_done = on_done
        self._in_flight = in_flight
        self._count = 0  # chunks cut so far
        self._live: dict[int, _Chunk] = {}  # by number: the chunks not yet sent on
        self._pending: asyncio.Queue[_Chunk | None] = asyncio.Queue(in_flight)
        self._out: asyncio.Queue[StageEvent | Exception | _Done] = asyncio.Queue(EVENT_QUEUE)
        self._started_at = 0.0
        self._start_ns = 0
        self._handoff_s = 0.0

    async def events(self, upstream: AsyncIterator[StageEvent]) -> AsyncIterator[StageEvent]:
        tasks = [
            asyncio.create_task(self._guard(self._feed(upstream)), name="handoff-feed"),
            asyncio.create_task(self._guard(self._emit()), name="handoff-emit"),
        ]
        try:
            while True:
                item = await self._out.get()
                if isinstance(item, _Done):
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            running = [*tasks, *(c.task for c in self._live.values() if c.task is not None)]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work`; its failure ends the merged stream with that error."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await self._out.put(exc)

    async def _feed(self, upstream: AsyncIterator[StageEvent]) -> None:
        """Pass upstream events on, and cut the previous stage's tokens into chunk calls."""
        token_ids: list[int] = []
        text = ""
        async with closing(upstream):
            async for event in upstream:
                await self._out.put(event)
                if event.stage_index != self._index - 1:
                    continue
                check_complete(event.delta, self._upstream_stage, self._spec.name)
                if event.delta.tensor is not None:
                    raise StreamedTensorError(
                        f"stage {self._spec.name!r} has input.stream_chunk, but stage "
                        f"{self._upstream_stage!r} sends tensors, and a streamed hand-off cuts "
                        f"only tokens into chunks; remove stream_chunk from stage "
                        f"{self._spec.name!r} in the pipeline file so it waits for the "
                        f"finished output"
                    )
                token_ids.extend(event.delta.token_ids)
                text += event.delta.text
                while len(token_ids) >= (size := self._size if self._count else self._first_size):
                    await self._start_chunk(token_ids[:size], text)
                    token_ids, text = token_ids[size:], ""
        if token_ids or not self._count:  # no chunk at all: the processor says why
            await self._start_chunk(token_ids, text)
        logger.debug(
            "request %s: %d chunks for stage %s", self._request_id, self._count, self._spec.name
        )
        await self._pending.put(None)

    async def _start_chunk(self, token_ids: list[int], text: str) -> None:
        """Cut one chunk and start its call; wait while STREAM_IN_FLIGHT chunks are pending."""
        number = self._count
        cut_ns = time.time_ns()  # before the edge's processor: its time is the hand-off's
        output = StageOutput(stage=self._upstream_stage, text=text, token_ids=tuple(token_ids))
        built = self._build_input(output)
        request_id = f"{self._request_id}-chunk{number}" if self._request_id else ""
        chunk = _Chunk(number, replace(built, request_id=request_id), time.monotonic())
        chunk.cut_ns = cut_ns
        await self._pending.put(chunk)
        ahead = self._live.get(number - self._in_flight)  # None: already sent on
        chunk.task = asyncio.create_task(
            self._guard(self._call(chunk, ahead)), name=f"handoff-chunk{number}"
        )
        self._live[number] = chunk
        self._count += 1

    async def _call(self, chunk: _Chunk, ahead: _Chunk | None) -> None:
        if ahead is not None:
            await ahead.emitted.wait()
        chunk.start_ns = time.time_ns()
        if chunk.number == 0:
            self._started_at, self._start_ns = time.monotonic(), chunk.start_ns
            self._handoff_s = self._started_at - chunk.ready_at
        deltas = call_stage(self._pool, self._spec, chunk.stage_input, deadline=self._deadline)
        async with closing(deltas):
            async for item in deltas:
                chunk.first_ns = chunk.first_ns or time.time_ns()
                if item[0].finished:
                    chunk.metrics = item[0].metrics
                await chunk.deltas.put(item)
        chunk.end_ns = time.time_ns()
        await chunk.deltas.put(None)

    async def _emit(self) -> None:
        """Send the chunks' outputs on in chunk order, then one `finished` for the stage."""
        first_at, first_ns, replica = 0.0, 0, ""
        finishes: list[OutputDelta] = []
        spans: list[ChunkSpan] = []
        while (chunk := await self._pending.get()) is not None:
            while (item := await chunk.deltas.get()) is not None:
                delta, replica = item
                if delta.finished:
                    finishes.append(delta)
                    delta = replace(delta, finished=False, finish_reason="", metrics=None)
                if not _has_content(delta):
                    continue
                if not first_at:
                    first_at, first_ns = time.monotonic(), time.time_ns()
                await self._out.put(self._event(delta, replica))
            chunk.emitted.set()
            spans.append(chunk.span())
            del self._live[chunk.number]
        ended = time.monotonic()
        first_at, first_ns = (first_at, first_ns) if first_at else (ended, time.time_ns())
        metrics = [d.metrics for d in finishes if d.metrics is not None]
        timing = StageTiming(
            queue_time_s=metrics[0].queue_time_s if metrics else 0.0,
            time_to_first_output_s=first_at - self._started_at,
            duration_s=ended - self._started_at,
            handoff_s=self._handoff_s,
            start_unix_ns=self._start_ns,
            first_output_unix_ns=first_ns,
            end_unix_ns=time.time_ns(),
            stage_time_s=sum(m.duration_s for m in metrics),
            stage_first_output_s=metrics[0].time_to_first_token_s if metrics else 0.0,
            chunks=tuple(spans),
        )
        finished = OutputDelta(
            request_id=self._request_id,
            finished=True,
            finish_reason=_finish_reason(finishes),
            metrics=RequestMetrics(
                queue_time_s=timing.queue_time_s,
                time_to_first_token_s=timing.time_to_first_output_s,
                prompt_tokens=sum(m.prompt_tokens for m in metrics),
                generated_tokens=sum(m.generated_tokens for m in metrics),
                duration_s=timing.duration_s,
            ),
        )
        event = replace(self._event(finished, replica), timing=timing)
        if self._on_done is not None:
            self._on_done(event)
        await self._out.put(event)
        await self._out.put(_Done())

    def _event(self, delta: OutputDelta, replica: str) -> StageEvent:
        return StageEvent(
            stage=self._spec.name,
            stage_index=self._index,
            request_id=self._request_id,
            delta=replace(delta, request_id=self._request_id),
            final=self._final,
            replica=replica,
        )
