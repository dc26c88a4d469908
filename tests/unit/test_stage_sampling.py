"""`stage_sampling` is checked whole before any stage is called: its keys, its values by the
shared rules, and each later stage's sampling by that stage's own engine (ValidateSampling)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from omnistage.errors import InvalidRequestError, OmnistageError
from omnistage.types import GenerateInput, SamplingOptions
from orchestrator.config import parse_pipeline
from orchestrator.runner import PipelineRunner, StageEvent
from tests.unit.fake_stages import FakePool, FakeReplica, FakeStage


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


# --- Issue 14: each later stage's own engine limits, checked before the first stage runs ---

THREE_STAGES = (
    "stages:\n"
    "  - {name: thinker, address: 'fake:1'}\n"
    "  - {name: talker, address: 'fake:2', sampling: {max_tokens: 4}}\n"
    "  - {name: code2wav, address: 'fake:3', input: {processor: token_ids}}\n"
)
BOUND = "sampling.temperature: temperature must be in [0, 2], got 2.5"


def three_stage_runner(**talker: Any) -> tuple[PipelineRunner, FakePool]:
    pool = FakePool(
        thinker=FakeStage("talker"), talker=FakeStage("talker", **talker), code2wav=FakeStage("c")
    )
    return PipelineRunner(parse_pipeline(THREE_STAGES), pool), pool  # type: ignore[arg-type]


def run_all(
    runner: PipelineRunner, stage_sampling: dict[str, SamplingOptions], **sampling: Any
) -> list[StageEvent]:
    async def run() -> list[StageEvent]:
        request = GenerateInput(request_id="r1", prompt="hi", sampling=SamplingOptions(**sampling))
        return [e async for e in runner.run(request, stage_sampling=stage_sampling)]

    return asyncio.run(run())


def test_talker_temperature_past_its_engine_bound_fails_before_the_thinker_runs() -> None:
    """Issue 14: the client got the thinker's tokens, then the talker's error."""
    runner, pool = three_stage_runner(refuse_sampling=BOUND)
    events: list[StageEvent] = []

    async def run() -> None:
        request = GenerateInput(request_id="r1", prompt="hi")
        overrides = {"talker": SamplingOptions(temperature=2.5)}
        async for event in runner.run(request, stage_sampling=overrides):
            events.append(event)

    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(run())
    assert str(caught.value) == f"stage 'talker': {BOUND}"
    assert events == []  # no token reached the client
    assert all(stage.calls == [] for stage in pool.stages.values())  # no stage ran
    # The talker was asked with what it would get: the override over the file's defaults.
    assert pool.stages["talker"].validated == [SamplingOptions(max_tokens=4, temperature=2.5)]
    assert len(pool.stages["thinker"].validated) == 1  # every stage is asked, concurrently


def test_each_later_stage_is_asked_once_per_sampling_then_the_verdict_is_cached() -> None:
    runner, pool = three_stage_runner()
    for _ in range(3):
        run_all(runner, {"talker": SamplingOptions(temperature=0.5)})
    talker, code2wav = pool.stages["talker"], pool.stages["code2wav"]
    assert len(talker.validated) == 1 and len(code2wav.validated) == 1
    assert len(talker.calls) == 3  # every request ran
    run_all(runner, {"talker": SamplingOptions(temperature=0.6)})
    assert len(talker.validated) == 2 and len(code2wav.validated) == 1


def test_a_cached_refusal_costs_no_call() -> None:
    runner, pool = three_stage_runner(refuse_sampling=BOUND)
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="stage 'talker'"):
            run_all(runner, {}, temperature=2.5)
    assert len(pool.stages["talker"].validated) == 1
    assert all(stage.calls == [] for stage in pool.stages.values())


class SilentStage(FakeStage):
    """A stage that gives no verdict: an older stage without ValidateSampling."""

    async def validate_sampling(self, options: SamplingOptions, *, timeout: float = 5.0) -> None:
        self.validated.append(options)
        raise OmnistageError("Method not found!", code="UNIMPLEMENTED")


def test_a_stage_that_gives_no_verdict_checks_the_values_when_called() -> None:
    pool = FakePool(
        thinker=FakeStage("talker"), talker=SilentStage("talker"), code2wav=FakeStage("c")
    )
    runner = PipelineRunner(parse_pipeline(THREE_STAGES), pool)  # type: ignore[arg-type]
    for _ in range(2):
        events = run_all(runner, {})
        assert {e.stage for e in events} == {"thinker", "talker", "code2wav"}
    assert len(pool.stages["talker"].validated) == 2  # nothing cached: asked again


def test_a_stage_without_a_serving_replica_is_not_asked() -> None:
    class DownPool(FakePool):
        def replicas(self, stage: str) -> list[FakeReplica]:
            health = "UNAVAILABLE" if stage == "talker" else "SERVING"
            return [FakeReplica(self.stages[stage], f"fake/{stage}", health)]

    pool = DownPool(
        thinker=FakeStage("talker"), talker=FakeStage("talker"), code2wav=FakeStage("c")
    )
    runner = PipelineRunner(parse_pipeline(THREE_STAGES), pool)  # type: ignore[arg-type]
    run_all(runner, {})
    assert pool.stages["talker"].validated == [] and len(pool.stages["code2wav"].validated) == 1


def test_the_verdict_cache_is_bounded_and_verdicts_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import preflight

    talker = FakeStage("talker")
    check = preflight.SamplingPreflight(FakePool(talker=talker), cache_size=2)  # type: ignore[arg-type]
    clock = [1000.0]
    monkeypatch.setattr(preflight.time, "monotonic", lambda: clock[0])

    def ask(temperature: float) -> None:
        asyncio.run(check.check([("talker", SamplingOptions(temperature=temperature))]))

    for temperature in (0.1, 0.2, 0.1, 0.3, 0.2):  # 0.2 was evicted by 0.3 (0.1 was newer)
        ask(temperature)
    assert [o.temperature for o in talker.validated] == [0.1, 0.2, 0.3, 0.2]
    clock[0] += preflight.VERDICT_TTL_S + 1
    ask(0.2)
    assert len(talker.validated) == 5  # expired: asked again
