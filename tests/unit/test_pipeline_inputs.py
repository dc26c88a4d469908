"""Issue 14, at the orchestrator, on fake stages: an oversized prompt never reaches a stage, a
duplicate in-flight request_id is ALREADY_EXISTS, a stage's own abort is never handed on as
complete, and a stage's empty output is FAILED_PRECONDITION naming it, not the client's error."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from omnistage.errors import AbortedError, AlreadyExistsError, InvalidRequestError
from omnistage.types import GenerateInput
from orchestrator.config import parse_pipeline
from orchestrator.processors import EmptyStageOutputError
from orchestrator.runner import PipelineRunner, StageEvent
from tests.unit.fake_stages import FakePool, FakeStage
from tests.waiting import eventually


def runner(pool: FakePool, *, chunk: int | None = None, **options: Any) -> PipelineRunner:
    stream = f", stream_chunk: {chunk}" if chunk else ""
    pipeline = parse_pipeline(
        "stages:\n"
        "  - {name: talker, address: fake:1}\n"
        f"  - {{name: code2wav, address: fake:2, input: {{processor: token_ids{stream}}}}}\n"
    )
    return PipelineRunner(pipeline, pool, **options)  # type: ignore[arg-type]


def fakes(**talker: Any) -> FakePool:
    return FakePool(talker=FakeStage("talker", **talker), code2wav=FakeStage("code2wav"))


async def collect(run: PipelineRunner, request: GenerateInput) -> list[StageEvent]:
    return [e async for e in run.run(request)]


def test_an_oversized_prompt_is_refused_before_any_stage() -> None:
    """Issue 14: a 30 MB prompt went through the orchestrator to a stage to be refused there."""
    pool = fakes()
    request = GenerateInput(request_id="r", prompt="x" * 30_000_000)
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(collect(runner(pool), request))
    message = str(info.value)
    assert "30,000,000 characters" in message
    assert "limit of 1,048,576 bytes of the orchestrator" in message
    assert "orchestrator serve --max-prompt-bytes" in message
    assert pool.stages["talker"].calls == [] and pool.stages["code2wav"].calls == []
    small = runner(fakes(), max_prompt_bytes=10)
    with pytest.raises(InvalidRequestError, match="limit of 10 bytes"):
        asyncio.run(collect(small, GenerateInput(request_id="r", prompt="x" * 11)))


def test_a_duplicate_in_flight_request_id_is_already_exists_and_the_first_completes() -> None:
    """Issue 14: through the orchestrator, a second caller's cancel of a shared request_id made
    the next stage run on truncated text. The second call is refused before any stage."""
    pool = fakes(tokens=20, delay=0.005)
    run = runner(pool)

    async def main() -> None:
        first: list[StageEvent] = []

        async def one() -> None:
            async for event in run.run(GenerateInput(request_id="same", prompt="hi")):
                first.append(event)

        task = asyncio.create_task(one())
        await eventually(lambda: first, timeout=10, what="the first request's first event")
        with pytest.raises(AlreadyExistsError, match="'same' is already in flight on the orc"):
            await collect(run, GenerateInput(request_id="same", prompt="hi"))
        await task
        code2wav = [t for e in first if e.stage == "code2wav" for t in e.delta.token_ids]
        assert code2wav == [t * 10 for t in range(20)]
        assert len(pool.stages["talker"].calls) == 1
        await collect(run, GenerateInput(request_id="same", prompt="hi"))  # free again

    asyncio.run(main())


@pytest.mark.parametrize("chunk", [None, 4])
def test_a_stage_that_aborted_on_its_own_is_not_handed_on_as_complete(chunk: int | None) -> None:
    """A `finished` with finish_reason abort that the orchestrator did not ask for: the next
    stage must not run on the partial output as if it were whole."""
    pool = fakes(tokens=3, finish_reason="abort")
    with pytest.raises(AbortedError) as info:
        asyncio.run(collect(runner(pool, chunk=chunk), GenerateInput(request_id="r", prompt="hi")))
    assert info.value.code == "ABORTED"
    assert "stage 'talker' ended the request early (finish_reason abort, after 3 tokens)" in str(
        info.value
    )
    assert "stage 'code2wav' did not run" in str(info.value)
    if chunk is None:
        assert pool.stages["code2wav"].calls == []


@pytest.mark.parametrize("chunk", [None, 4])
def test_a_stage_with_empty_output_is_failed_precondition_naming_it(chunk: int | None) -> None:
    """Issue 14: 75 of 200 valid requests got INVALID_ARGUMENT "stage 'thinker' produced no
    text". The request is valid; the pipeline could not go on: FAILED_PRECONDITION."""
    pool = fakes(tokens=0)
    with pytest.raises(EmptyStageOutputError) as info:
        asyncio.run(collect(runner(pool, chunk=chunk), GenerateInput(request_id="r", prompt="hi")))
    assert info.value.code == "FAILED_PRECONDITION"
    assert not isinstance(info.value, InvalidRequestError)
    assert "stage 'talker' produced no token ids" in str(info.value)
    assert pool.stages["code2wav"].calls == []
