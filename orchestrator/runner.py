"""Runs one request through every stage of a pipeline and streams each stage's output."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from omnistage.errors import InvalidRequestError, OmnistageError
from omnistage.types import GenerateInput, OutputDelta, SamplingOptions
from orchestrator.config import PipelineConfig
from orchestrator.pool import StagePool
from orchestrator.processors import EdgeProcessor, StageOutput, resolve_processor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageTiming:
    """One stage's share of one request, in seconds, plus wall-clock marks for timelines."""

    queue_time_s: float
    time_to_first_output_s: float
    duration_s: float
    handoff_s: float
    start_unix_ns: int
    first_output_unix_ns: int
    end_unix_ns: int


@dataclass(frozen=True)
class StageEvent:
    """One piece of a pipeline's output, tagged with the stage that produced it."""

    stage: str
    stage_index: int
    request_id: str
    delta: OutputDelta
    final: bool
    timing: StageTiming | None = None
    replica: str = ""


def name_stage(error: OmnistageError, stage: str) -> OmnistageError:
    """The same kind of error (so the same status code), its message prefixed with the stage."""
    renamed = type(error)(f"stage {stage!r}: {error}")
    renamed.__cause__ = error
    return renamed


class PipelineRunner:
    """Chains the stages: stage N's finished output becomes stage N+1's input."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        pool: StagePool,
        *,
        on_stage_done: Callable[[StageEvent], None] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._pool = pool
        self._on_stage_done = on_stage_done
        self._processors: list[EdgeProcessor] = [
            resolve_processor(spec.input) for spec in pipeline.stages
        ]
        self._names = [spec.name for spec in pipeline.stages]

    def check_stage_sampling(self, stage_sampling: dict[str, SamplingOptions]) -> None:
        unknown = sorted(set(stage_sampling) - set(self._names))
        if unknown:
            raise InvalidRequestError(
                f"stage_sampling names unknown stages {unknown}; the stages are {self._names}"
            )

    async def run(
        self,
        request: GenerateInput,
        *,
        stage_sampling: dict[str, SamplingOptions] | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[StageEvent]:
        """Yield every stage's deltas (or the final stage's only), in stage order."""
        overrides = stage_sampling or {}
        self.check_stage_sampling(overrides)
        last = len(self._names) - 1
        stage_input = request
        text, token_ids = "", list[int]()
        handoff_started = time.monotonic()
        for index, spec in enumerate(self._pipeline.stages):
            if index > 0:
                previous = StageOutput(
                    stage=self._names[index - 1], text=text, token_ids=tuple(token_ids)
                )
                try:
                    stage_input = self._processors[index](previous, request, spec.input)
                except OmnistageError as exc:
                    raise name_stage(exc, spec.name) from exc
            sampling = overrides.get(spec.name, SamplingOptions()).merged_over(
                request.sampling.merged_over(spec.sampling.to_options())
            )
            stage_input = replace(stage_input, request_id=request.request_id, sampling=sampling)
            text, token_ids = "", []
            show = self._pipeline.outputs == "all" or index == last
            async for event in self._run_stage(
                index, stage_input, handoff_started, deadline=deadline, final=index == last
            ):
                text += event.delta.text
                token_ids.extend(event.delta.token_ids)
                if show:
                    yield event
            handoff_started = time.monotonic()

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
        replica = self._pool.next_replica(spec.name)
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        if spec.timeout_s is not None:
            timeout = spec.timeout_s if timeout is None else min(timeout, spec.timeout_s)
        started = time.monotonic()
        start_ns = time.time_ns()
        handoff = started - handoff_started
        first_at, first_ns = 0.0, 0
        try:
            async for delta in replica.client.generate(stage_input, timeout=timeout):
                if not first_at:
                    first_at, first_ns = time.monotonic(), time.time_ns()
                timing = None
                if delta.finished:
                    timing = StageTiming(
                        queue_time_s=delta.metrics.queue_time_s if delta.metrics else 0.0,
                        time_to_first_output_s=first_at - started,
                        duration_s=time.monotonic() - started,
                        handoff_s=handoff,
                        start_unix_ns=start_ns,
                        first_output_unix_ns=first_ns,
                        end_unix_ns=time.time_ns(),
                    )
                event = StageEvent(
                    stage=spec.name,
                    stage_index=index,
                    request_id=stage_input.request_id,
                    delta=delta,
                    final=final,
                    timing=timing,
                    replica=replica.address,
                )
                if timing is not None and self._on_stage_done is not None:
                    self._on_stage_done(event)
                yield event
        except OmnistageError as exc:
            logger.info("request %s failed in stage %s: %s", stage_input.request_id, spec.name, exc)
            raise name_stage(exc, spec.name) from exc
