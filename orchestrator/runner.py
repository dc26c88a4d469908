"""Runs one request through every stage of a pipeline and streams each stage's output.

Each stage is a stream of events that wraps the previous stage's: it passes the upstream events
on and adds its own. A stage either waits for the previous stage's finished output, or, with
`input.stream_chunk`, starts on chunks of it while it still generates (`orchestrator.streaming`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import replace

from omnistage import shm, shm_session
from omnistage.errors import InvalidRequestError, OmnistageError, echo
from omnistage.server.request_ids import InflightRequestIds
from omnistage.types import GenerateInput, SamplingOptions, TensorData
from omnistage.validation import DEFAULT_MAX_PROMPT_BYTES, check_prompt_bytes, validate_sampling
from orchestrator.config import PipelineConfig
from orchestrator.pool import StagePool
from orchestrator.preflight import SamplingPreflight
from orchestrator.processors import EdgeProcessor, StageOutput, resolve_processor
from orchestrator.stage_call import (
    StageEvent,
    StageTiming,
    call_stage,
    check_complete,
    closing,
    name_stage,
)
from orchestrator.streaming import StreamedStage

__all__ = ["PipelineRunner", "StageEvent", "StageTiming", "name_stage"]

logger = logging.getLogger(__name__)


class PipelineRunner:
    """Chains the stages: stage N's finished output becomes stage N+1's input."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        pool: StagePool,
        *,
        on_stage_done: Callable[[StageEvent], None] | None = None,
        max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
    ) -> None:
        self._pipeline = pipeline
        self._max_prompt_bytes = max_prompt_bytes
        self._request_ids = InflightRequestIds("the orchestrator")
        self._pool = pool
        self._on_stage_done = on_stage_done
        self._processors: list[EdgeProcessor] = [
            resolve_processor(spec.input) for spec in pipeline.stages
        ]
        self._names = [spec.name for spec in pipeline.stages]
        self._preflight = SamplingPreflight(pool)
        shared = pipeline.shared_memory
        self._shm_domain = shm.local_domain() if shared.enabled else ""
        # The stages whose outputs the client receives (`outputs`); the others' go to the
        # next stage only, so their tensors may stay in shared memory.
        self._sent = frozenset(self._names if pipeline.outputs == "all" else self._names[-1:])
        self._shm_outputs = frozenset(self._names) - self._sent
        self.segment_pool = shm_session.SegmentPool() if self._shm_domain else None

    def check_stage_sampling(self, stage_sampling: dict[str, SamplingOptions]) -> None:
        """Every override names a stage and holds valid values, checked before any stage runs."""
        unknown = sorted(set(stage_sampling) - set(self._names))
        if unknown:
            raise InvalidRequestError(
                f"stage_sampling names unknown stages {', '.join(echo(n) for n in unknown[:5])}"
                f"; the stages are {self._names}"
            )
        for name, options in stage_sampling.items():
            try:
                validate_sampling(options)
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"stage_sampling[{echo(name)}]: {exc}") from exc

    async def run(
        self,
        request: GenerateInput,
        *,
        stage_sampling: dict[str, SamplingOptions] | None = None,
        deadline: float | None = None,
        read: Collection[str] | None = None,
    ) -> AsyncIterator[StageEvent]:
        """Yield every stage's deltas (or the final stage's only), each stage's in order.

        `read` names the stages whose deltas the caller reads as they come (None: those the
        pipeline's `outputs` sends, every stage or the final one). Any other stage that feeds
        a stage waiting for its whole output is asked for that whole output only
        (`GenerateInput.final_only`): a vLLM stage then sends one message, not one per token,
        and its event comes once, finished.

        The request's text is checked against --max-prompt-bytes and its request_id must not
        be in flight already (ALREADY_EXISTS), both before any stage is called."""
        overrides = stage_sampling or {}
        self.check_stage_sampling(overrides)
        check_prompt_bytes(
            request,
            max_bytes=self._max_prompt_bytes,
            where="the orchestrator",
            flag="orchestrator serve --max-prompt-bytes",
        )
        segments = shm_session.request_session(  # removes the request's segments at its end
            domain=self._shm_domain,
            min_bytes=self._pipeline.shared_memory.min_bytes,
            output_stages=self._shm_outputs,
            pool=self.segment_pool,
        )
        with self._request_ids.hold(request.request_id), segments:
            events = self._run(request, overrides, deadline=deadline, read=read)
            async with closing(events):  # closing `run` closes every stage's call now
                async for event in events:
                    yield event

    async def _run(
        self,
        request: GenerateInput,
        overrides: dict[str, SamplingOptions],
        *,
        deadline: float | None,
        read: Collection[str] | None,
    ) -> AsyncIterator[StageEvent]:
        last = len(self._names) - 1
        samplings = [self._sampling(i, request, overrides) for i in range(last + 1)]
        whole = self._whole_output_only(read)
        # Every stage's engine is asked (once per sampling: the verdicts are cached) before
        # any stage runs, so a value a later stage refuses reaches no earlier stage.
        await self._preflight.check(
            list(zip(self._names, samplings, strict=True)), deadline=deadline
        )
        first_input = replace(request, sampling=samplings[0], final_only=whole[0])
        events = self._run_stage(
            0, first_input, time.monotonic(), deadline=deadline, final=not last
        )
        for index in range(1, last + 1):
            spec = self._pipeline.stages[index]
            sampling = samplings[index]
            if spec.input.stream_chunk is None:
                events = self._after(
                    index, events, request, sampling, deadline=deadline, final_only=whole[index]
                )
                continue
            streamed = StreamedStage(
                index=index,
                spec=spec,
                upstream_stage=self._names[index - 1],
                pool=self._pool,
                build_input=self._input_builder(index, request, sampling),
                request_id=request.request_id,
                deadline=deadline,
                final=index == last,
                on_done=self._on_stage_done,
            )
            events = streamed.events(events)
        async with closing(events):
            async for event in events:
                if event.stage in self._sent:
                    yield event

    def _whole_output_only(self, read: Collection[str] | None) -> list[bool]:
        """Per stage, whether only its whole output is needed: no one reads its deltas, it is
        not the final stage, and the next stage waits for its finished output."""
        read = self._sent if read is None else read
        stages = self._pipeline.stages
        return [
            index < len(stages) - 1
            and name not in read
            and stages[index + 1].input.stream_chunk is None
            for index, name in enumerate(self._names)
        ]

    def _sampling(
        self, index: int, request: GenerateInput, overrides: dict[str, SamplingOptions]
    ) -> SamplingOptions:
        """The request's per-stage override, over its sampling, over the stage's defaults."""
        spec = self._pipeline.stages[index]
        return overrides.get(spec.name, SamplingOptions()).merged_over(
            request.sampling.merged_over(spec.sampling.to_options())
        )

    def _input_builder(
        self, index: int, request: GenerateInput, sampling: SamplingOptions
    ) -> Callable[[StageOutput], GenerateInput]:
        """Stage `index`'s input from (part of) the previous stage's output, by the edge."""
        spec = self._pipeline.stages[index]

        def build(previous: StageOutput) -> GenerateInput:
            try:
                built = self._processors[index](previous, request, spec.input)
            except OmnistageError as exc:
                raise name_stage(exc, spec.name) from exc
            return replace(built, request_id=request.request_id, sampling=sampling)

        return build

    async def _after(
        self,
        index: int,
        upstream: AsyncIterator[StageEvent],
        request: GenerateInput,
        sampling: SamplingOptions,
        *,
        deadline: float | None,
        final_only: bool,
    ) -> AsyncIterator[StageEvent]:
        """The upstream events, then stage `index` on the previous stage's finished output
        (all of it in one message when `final_only`)."""
        text, token_ids, tensors = "", list[int](), list[TensorData]()
        async with closing(upstream):
            async for event in upstream:
                if event.stage_index == index - 1:
                    check_complete(event.delta, event.stage, self._names[index])
                    text += event.delta.text
                    token_ids.extend(event.delta.token_ids)
                    if event.delta.tensor is not None:
                        tensors.append(event.delta.tensor)
                yield event
        handoff_started = time.monotonic()
        previous = StageOutput(
            stage=self._names[index - 1],
            text=text,
            token_ids=tuple(token_ids),
            tensors=tuple(tensors),
        )
        stage_input = self._input_builder(index, request, sampling)(previous)
        stage_input = replace(stage_input, final_only=final_only)
        final = index == len(self._names) - 1
        async for event in self._run_stage(
            index, stage_input, handoff_started, deadline=deadline, final=final
        ):
            yield event

    async def _run_stage(
        self,
        index: int,
        stage_input: GenerateInput,
        handoff_started: float,
        *,
        deadline: float | None,
        final: bool,
    ) -> AsyncIterator[StageEvent]:
        spec = self._pipeline.stages[index]
        started = time.monotonic()
        start_ns = time.time_ns()
        handoff = started - handoff_started
        first_at, first_ns = 0.0, 0
        deltas = call_stage(self._pool, spec, stage_input, deadline=deadline)
        async with closing(deltas):
            async for delta, replica in deltas:
                if not first_at:
                    first_at, first_ns = time.monotonic(), time.time_ns()
                timing = None
                if delta.finished and stage_input.final_only and delta.metrics is not None:
                    # One message at the end: the stage's own clock says when output began.
                    ttft = delta.metrics.time_to_first_token_s
                    first_at, first_ns = started + ttft, start_ns + int(ttft * 1e9)
                if delta.finished:
                    timing = StageTiming(
                        queue_time_s=delta.metrics.queue_time_s if delta.metrics else 0.0,
                        time_to_first_output_s=first_at - started,
                        duration_s=time.monotonic() - started,
                        handoff_s=handoff,
                        start_unix_ns=start_ns,
                        first_output_unix_ns=first_ns,
                        end_unix_ns=time.time_ns(),
                        stage_time_s=delta.metrics.duration_s if delta.metrics else 0.0,
                        stage_first_output_s=(
                            delta.metrics.time_to_first_token_s if delta.metrics else 0.0
                        ),
                    )
                event = StageEvent(
                    stage=spec.name,
                    stage_index=index,
                    request_id=stage_input.request_id,
                    delta=delta,
                    final=final,
                    timing=timing,
                    replica=replica,
                )
                if timing is not None and self._on_stage_done is not None:
                    self._on_stage_done(event)
                yield event
