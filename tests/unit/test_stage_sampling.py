"""`stage_sampling` is checked whole before any stage is called: its keys and its values."""

from __future__ import annotations

import asyncio

import pytest

from omnistage.errors import InvalidRequestError
from omnistage.types import GenerateInput, SamplingOptions
from orchestrator.config import parse_pipeline
from orchestrator.runner import PipelineRunner
from tests.unit.fake_stages import FakePool, FakeStage


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (SamplingOptions(max_tokens=0), "max_tokens must be ≥ 1 (got 0)"),
        (SamplingOptions(temperature=-1.0), "temperature must be ≥ 0"),
        (SamplingOptions(top_p=1.5), "top_p must lie in (0, 1] (got 1.5)"),
        (SamplingOptions(top_k=-2), "top_k must be ≥ 1"),
        (SamplingOptions(stop=("",)), "stop strings must not be empty"),
    ],
)
def test_a_bad_override_for_a_later_stage_fails_before_any_stage(
    options: SamplingOptions, words: str
) -> None:
    pipeline = parse_pipeline(
        "stages:\n"
        "  - {name: talker, address: 'fake:1'}\n"
        "  - {name: code2wav, address: 'fake:2', input: {processor: token_ids}}\n"
    )
    pool = FakePool(talker=FakeStage("talker"), code2wav=FakeStage("code2wav"))
    runner = PipelineRunner(pipeline, pool)  # type: ignore[arg-type]

    async def run() -> None:
        request = GenerateInput(request_id="r1", prompt="hi")
        async for _event in runner.run(request, stage_sampling={"code2wav": options}):
            pass

    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(run())
    assert str(caught.value).startswith("stage_sampling['code2wav']: ")
    assert words in str(caught.value)
    assert pool.stages["talker"].calls == [] and pool.stages["code2wav"].calls == []
