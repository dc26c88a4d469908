"""The runner's streaming hand-off, on fake stages: order, one `finished`, cancellation, errors."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from omnistage.errors import InvalidRequestError, OmnistageError
from omnistage.types import GenerateInput
from orchestrator.config import PipelineConfigError, parse_pipeline
from orchestrator.processors import EmptyStageOutputError
from orchestrator.runner import PipelineRunner, StageEvent
from orchestrator.streaming import StreamedTensorError
from tests.unit.fake_stages import FakePool, FakeStage


def runner(
    stream_chunk: int | None, pool: FakePool, done: list[StageEvent], first: int | None = None
) -> PipelineRunner:
    chunk = f", stream_chunk: {stream_chunk}" if stream_chunk else ""
    chunk += f", stream_first_chunk: {first}" if first else ""
    pipeline = parse_pipeline(
        "stages:\n"
        "  - {name: talker, address: fake:1}\n"
        f"  - {{name: code2wav, address: fake:2, input: {{processor: token_ids{chunk}}}}}\n"
    )
    return PipelineRunner(pipeline, pool, on_stage_done=done.append)  # type: ignore[arg-type]


async def collect(run: PipelineRunner, **kwargs: Any) -> list[StageEvent]:
    return [e async for e in run.run(GenerateInput(request_id="r1", prompt="hi"), **kwargs)]


def outputs(events: list[StageEvent], stage: str) -> list[int]:
    return [t for e in events if e.stage == stage for t in e.delta.token_ids]


@pytest.mark.parametrize("chunk", [None, 4, 5, 100])
def test_streamed_outputs_equal_waiting_ones_in_order(chunk: int | None) -> None:
    pool = FakePool(talker=FakeStage("talker"), code2wav=FakeStage("code2wav"))
    done: list[StageEvent] = []
    events = asyncio.run(collect(runner(chunk, pool, done)))
    assert outputs(events, "code2wav") == [t * 10 for t in range(10)]
    finished = [e for e in events if e.stage == "code2wav" and e.delta.finished]
    assert finished == [events[-1]] and events[-1].final and events[-1].timing is not None
    assert events[-1].delta.metrics is not None and events[-1].delta.finish_reason == "stop"
    size = chunk or 10
    expected = [list(range(i, min(i + size, 10))) for i in range(0, 10, size)]
    assert [list(c.token_ids) for c in pool.stages["code2wav"].calls] == expected
    assert [e.stage for e in done] == ["talker", "code2wav"]  # once per stage
    if chunk is not None and chunk < 10:
        ids = [c.request_id for c in pool.stages["code2wav"].calls]
        assert ids == [f"r1-chunk{n}" for n in range(len(expected))]
        timing = done[1].timing
        assert timing is not None and timing.duration_s >= timing.time_to_first_output_s > 0
        assert all(e.request_id == "r1" for e in events)


@pytest.mark.parametrize(
    ("first", "sizes"), [(2, [2, 4, 4]), (1, [1, 4, 4, 1]), (4, [4, 4, 2]), (12, [10])]
)
def test_a_small_first_chunk_then_stream_chunk_sized_ones(first: int, sizes: list[int]) -> None:
    pool = FakePool(talker=FakeStage("talker"), code2wav=FakeStage("code2wav"))
    events = asyncio.run(collect(runner(4, pool, [], first=first)))
    assert [len(c.token_ids) for c in pool.stages["code2wav"].calls] == sizes
    assert outputs(events, "code2wav") == [t * 10 for t in range(10)]  # all of it, in order


def test_streaming_starts_before_upstream_finishes() -> None:
    pool = FakePool(talker=FakeStage("talker", tokens=20), code2wav=FakeStage("code2wav"))
    events = asyncio.run(collect(runner(4, pool, [])))
    first_audio = next(i for i, e in enumerate(events) if e.stage == "code2wav")
    talker_done = next(i for i, e in enumerate(events) if e.stage == "talker" and e.delta.finished)
    assert first_audio < talker_done


@pytest.mark.parametrize("chunk", [None, 4])
def test_the_clients_deadline_reaches_every_stage_call(chunk: int | None) -> None:
    """Each stage call carries what is left of the client's deadline, so a stage stops
    working on a request the client has given up on, whether the edge waits or streams."""
    talker, code2wav = FakeStage("talker"), FakeStage("code2wav")
    pool = FakePool(talker=talker, code2wav=code2wav)
    started = time.monotonic()
    asyncio.run(collect(runner(chunk, pool, []), deadline=started + 30.0))
    elapsed = time.monotonic() - started
    timeouts = talker.timeouts + code2wav.timeouts
    assert len(code2wav.timeouts) == (3 if chunk else 1)
    assert all(t is not None and 30.0 - elapsed - 0.5 <= t <= 30.0 for t in timeouts), timeouts
    # no deadline from the client: no deadline on the stage calls either
    talker.timeouts.clear()
    asyncio.run(collect(runner(chunk, pool, [])))
    assert talker.timeouts == [None]


def test_cancelling_mid_stream_cancels_every_call() -> None:
    talker = FakeStage("talker", tokens=200, delay=0.005)
    code2wav = FakeStage("code2wav", delay=0.01)
    pool = FakePool(talker=talker, code2wav=code2wav)

    async def main() -> None:
        events = runner(4, pool, []).run(GenerateInput(request_id="r1", prompt="hi"))
        async for event in events:
            if event.stage == "code2wav":
                break
        assert talker.active == 1 and code2wav.active >= 1
        await events.aclose()  # type: ignore[attr-defined]
        assert talker.active == 0 and code2wav.active == 0
        assert talker.cancelled == 1 and code2wav.cancelled >= 1

    asyncio.run(main())


def test_a_failing_chunk_names_the_stage_and_cancels_upstream() -> None:
    talker = FakeStage("talker", tokens=200, delay=0.005)
    pool = FakePool(talker=talker, code2wav=FakeStage("code2wav", fail_on_call=1))
    with pytest.raises(InvalidRequestError, match=r"stage 'code2wav': codes must lie") as info:
        asyncio.run(collect(runner(4, pool, [])))
    assert isinstance(info.value, OmnistageError)
    assert talker.active == 0 and talker.cancelled == 1


def test_no_upstream_tokens_is_the_processors_error() -> None:
    pool = FakePool(talker=FakeStage("talker", tokens=0), code2wav=FakeStage("code2wav"))
    with pytest.raises(EmptyStageOutputError, match=r"stage 'code2wav'.*produced no token ids"):
        asyncio.run(collect(runner(4, pool, [])))


def test_a_streamed_edge_after_a_tensor_stage_fails_rather_than_send_empty_chunks() -> None:
    talker = FakeStage("talker", tokens=200, delay=0.005, tensors=True)
    code2wav = FakeStage("code2wav")
    pool = FakePool(talker=talker, code2wav=code2wav)
    with pytest.raises(StreamedTensorError) as info:
        asyncio.run(collect(runner(4, pool, [])))
    assert info.value.code == "FAILED_PRECONDITION"
    message = str(info.value)
    assert "'talker' sends tensors" in message and "remove stream_chunk" in message
    assert code2wav.calls == [] and talker.active == 0  # upstream closed, nothing sent on


LAUNCHED = """\
stages:
  - {{name: vocoder, address: "127.0.0.1:5001"}}
  - {{name: encoder, address: "127.0.0.1:5002", input: {{processor: token_ids, stream_chunk: 4}}}}
launch:
  stages:
    vocoder: {{engine: {engine}, model: {model}, port: 5001}}
"""


def test_a_streamed_edge_after_a_launched_torch_stage_is_refused_at_load() -> None:
    text = LAUNCHED.format(engine="torch", model="examples.omni.code2wav:build")
    with pytest.raises(PipelineConfigError) as info:
        parse_pipeline(text, source="p.yaml")
    assert info.value.problems == [
        "p.yaml:3: stages[1].input.stream_chunk: stage 'vocoder' is a torch stage "
        "(launch.stages): its tensors cannot stream in chunks of tokens; remove stream_chunk "
        "to wait for its finished output"
    ]
    parse_pipeline(LAUNCHED.format(engine="vllm", model="smollm2"))


def test_a_caller_that_stops_reading_holds_back_every_stage() -> None:
    """The hand-off's queues are bounded: while the caller reads nothing, the talker is read
    no further than a few chunks ahead and no more chunk calls start; once the caller reads
    on, every token arrives, in order."""
    from orchestrator.streaming import CHUNK_QUEUE, EVENT_QUEUE, STREAM_IN_FLIGHT

    tokens, chunk = 2000, 4
    talker = FakeStage("talker", tokens=tokens, delay=0.0)
    pool = FakePool(talker=talker, code2wav=FakeStage("code2wav", delay=0.0))
    run = runner(chunk, pool, [])

    async def main() -> tuple[int, list[StageEvent]]:
        events = run.run(GenerateInput(request_id="r1", prompt="hi"))
        first = [await anext(events)]
        for _ in range(5000):  # let every producer run as far as its queues allow
            await asyncio.sleep(0)
        started = len(pool.stages["code2wav"].calls)
        rest = [e async for e in events]
        return started, first + rest

    started, events = asyncio.run(main())
    # an unbounded hand-off would have started all 500 chunk calls by now
    most = STREAM_IN_FLIGHT + 1 + (EVENT_QUEUE + CHUNK_QUEUE * STREAM_IN_FLIGHT) // chunk
    assert 0 < started <= most, (started, most)
    assert outputs(events, "code2wav") == [t * 10 for t in range(tokens)]
    assert len(pool.stages["code2wav"].calls) == tokens // chunk
