"""Issue 18, coalescing deltas no one reads: the orchestrator asks a stage for its whole output
in one message (`GenerateInput.final_only`) when its caller does not read that stage's deltas
and the next stage waits for its finished output; every other stage streams as before. The
real vLLM stage's side is tests/integration/test_stage_generate.py's."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import pytest

from omnistage.types import GenerateInput, OutputDelta, RequestMetrics
from orchestrator.config import PipelineConfig, parse_pipeline
from orchestrator.runner import PipelineRunner, StageEvent
from tests.unit.fake_stages import FakePool, FakeStage


def pipeline(outputs: str, chunk: int | None = None) -> PipelineConfig:
    stream = f", stream_chunk: {chunk}" if chunk else ""
    return parse_pipeline(
        f"outputs: {outputs}\n"
        "stages:\n"
        "  - {name: talker, address: fake:1}\n"
        f"  - {{name: code2wav, address: fake:2, input: {{processor: token_ids{stream}}}}}\n"
    )


def run(
    *, outputs: str = "all", chunk: int | None = None, read: Collection[str] | None = None
) -> tuple[FakePool, list[StageEvent]]:
    pool = FakePool(talker=FakeStage("talker", tokens=4), code2wav=FakeStage("code2wav"))
    runner = PipelineRunner(pipeline(outputs, chunk), pool)  # type: ignore[arg-type]

    async def collect() -> list[StageEvent]:
        return [e async for e in runner.run(GenerateInput(request_id="r", prompt="hi"), read=read)]

    return pool, asyncio.run(collect())


def asked_whole(pool: FakePool) -> dict[str, list[bool]]:
    return {name: [c.final_only for c in stage.calls] for name, stage in pool.stages.items()}


def test_outputs_final_asks_the_first_stage_for_its_whole_output() -> None:
    pool, events = run(outputs="final")
    assert asked_whole(pool) == {"talker": [True], "code2wav": [False]}
    # The hand-off is unchanged: code2wav got every token the talker made.
    assert pool.stages["code2wav"].calls[0].token_ids == (0, 1, 2, 3)
    assert [e.delta.token_ids for e in events if e.delta.token_ids] == [(0,), (10,), (20,), (30,)]


def test_outputs_all_streams_every_stage() -> None:
    pool, events = run(outputs="all")
    assert asked_whole(pool) == {"talker": [False], "code2wav": [False]}
    assert sum(1 for e in events if e.stage == "talker") == 5  # four tokens, then finished


@pytest.mark.parametrize(
    ("read", "expected"),
    [
        ({"code2wav"}, [True]),  # the HTTP reply reads the text stage and the final stage
        ({"talker", "code2wav"}, [False]),
        ((), [True]),
    ],
)
def test_the_stages_the_caller_reads_stream(read: set[str], expected: list[bool]) -> None:
    pool, _ = run(outputs="all", read=read)
    assert asked_whole(pool)["talker"] == expected
    assert asked_whole(pool)["code2wav"] == [False]  # the final stage always streams


def test_a_stage_feeding_a_streamed_edge_still_streams() -> None:
    """With `stream_chunk`, the next stage starts on chunks of the deltas: they are needed."""
    pool, _ = run(outputs="final", chunk=2)
    assert asked_whole(pool)["talker"] == [False]
    assert all(not whole for whole in asked_whole(pool)["code2wav"])


def test_a_whole_output_stage_times_its_first_output_by_the_stage() -> None:
    """One message at the end: the stage's own time to first token stands for when output
    began, not the arrival of that one message."""

    class Whole(FakeStage):
        async def generate(self, request, **kwargs):  # type: ignore[no-untyped-def,override]
            self.calls.append(request)
            await asyncio.sleep(0.05)
            metrics = RequestMetrics(
                prompt_tokens=1, generated_tokens=2, time_to_first_token_s=0.01, duration_s=0.05
            )
            yield OutputDelta(
                request.request_id,
                token_ids=(1, 2),
                text="1 2",
                finished=True,
                finish_reason="stop",
                metrics=metrics,
            )

    done: list[StageEvent] = []
    pool = FakePool(talker=Whole("talker"), code2wav=FakeStage("code2wav"))
    runner = PipelineRunner(
        pipeline("final"),
        pool,  # type: ignore[arg-type]
        on_stage_done=done.append,
    )

    async def collect() -> None:
        async for _ in runner.run(GenerateInput(request_id="r", prompt="hi")):
            pass

    asyncio.run(collect())
    talker = next(e for e in done if e.stage == "talker")
    assert talker.timing is not None
    assert talker.timing.time_to_first_output_s == pytest.approx(0.01)
    assert talker.timing.duration_s >= 0.05
