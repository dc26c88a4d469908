"""The critical path of a request (omnistage.traces.critical), on hand-made span sets whose
every segment is known: the segments tile the request's time exactly, in ns."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import asdict

import pytest

from omnistage.traces.critical import (
    COMPUTE,
    HANDOFF,
    QUEUED,
    TRANSPORT,
    WAITING,
    bound_by,
    critical_path,
    critical_paths,
    request_chains,
)
from omnistage.traces.spans import ChunkSpan, RequestSpan, span_from_mapping
from omnistage.types import CriticalSegment, GenerateInput, RequestCriticalPath
from orchestrator.config import parse_pipeline
from orchestrator.runner import PipelineRunner, StageEvent
from tests.unit.fake_stages import FakePool, FakeStage

T0 = 1_700_000_000_000_000_000


def at(ms: float) -> int:
    """A moment `ms` after T0, in unix ns."""
    return T0 + round(ms * 1e6)


def span(
    stage: str, index: int, start: float, first: float, end: float, **kw: object
) -> RequestSpan:
    fields: dict[str, object] = {"handoff_s": 0.0, "queue_time_s": 0.0} | kw
    return RequestSpan(
        "r1",
        stage,
        index,
        "",
        at(start),
        at(first),
        at(end),
        **fields,  # type: ignore[arg-type]
    )


def chunk(
    ready: float,
    start: float,
    first: float,
    end: float,
    own: float,
    own_first: float = 0.0,
    queue: float = 0.0,
) -> ChunkSpan:
    """A chunk call, every time in ms; `own*` and `queue` are the stage's own times."""
    times = (at(ready), at(start), at(first), at(end))
    return ChunkSpan(*times, own / 1e3, own_first / 1e3, queue / 1e3)


def plain(path: tuple[CriticalSegment, ...]) -> list[tuple[str, str, float, float]]:
    """Segments as (stage, kind, start ms, end ms)."""
    return [
        (s.stage, s.kind, (s.start_unix_ns - T0) / 1e6, (s.end_unix_ns - T0) / 1e6) for s in path
    ]


def assert_tiles(path: RequestCriticalPath) -> None:
    """Both paths run from the request's start to their target, each segment where the one
    before it ended: their sums are the times, to the ns."""
    for segments, target in (
        (path.first_output, path.first_output_unix_ns),
        (path.end_to_end, path.end_unix_ns),
    ):
        assert segments[0].start_unix_ns == path.start_unix_ns
        assert segments[-1].end_unix_ns == target
        for before, after in itertools.pairwise(segments):
            assert before.end_unix_ns == after.start_unix_ns
            assert (before.stage, before.kind) != (after.stage, after.kind)  # joined
        assert all(s.end_unix_ns > s.start_unix_ns for s in segments)
        assert sum(s.end_unix_ns - s.start_unix_ns for s in segments) == target - path.start_unix_ns


THINKER = span(
    "thinker", 0, 0, 10, 40, queue_time_s=0.001, stage_time_s=0.038, stage_first_output_s=0.009
)
TALKER = span(
    "talker", 1, 42, 50, 300, handoff_s=0.002, queue_time_s=0.002, stage_time_s=0.250,
    stage_first_output_s=0.006,
)  # fmt: skip
CODE2WAV = span(
    "code2wav", 2, 151, 161, 312, handoff_s=0.001, queue_time_s=0.001, stage_time_s=0.034,
    stage_first_output_s=0.007,
    chunks=(
        chunk(150, 151, 160, 170, own=15, own_first=7, queue=1),
        chunk(250, 251, 255, 265, own=12, own_first=3),
        chunk(301, 302, 305, 310, own=7, own_first=2, queue=0.5),
    ),
)  # fmt: skip


def test_the_talkers_chunking_bounds_a_streamed_pipelines_first_output() -> None:
    path = critical_path([THINKER, TALKER, CODE2WAV])
    assert_tiles(path)
    assert path.time_to_first_output_s == pytest.approx(0.161)
    assert plain(path.first_output) == [
        ("thinker", QUEUED, 0, 1),
        ("thinker", COMPUTE, 1, 38),  # its own 38 ms, less 1 ms queued
        ("thinker", TRANSPORT, 38, 40),  # 40 ms seen by the orchestrator, 38 ms its own
        ("talker", HANDOFF, 40, 42),
        ("talker", QUEUED, 42, 44),
        ("talker", COMPUTE, 44, 48),  # to its first output: 6 ms its own, 2 of them queued
        ("talker", TRANSPORT, 48, 50),
        ("code2wav", WAITING, 50, 150),  # the talker made the first chunk's tokens
        ("code2wav", HANDOFF, 150, 151),
        ("code2wav", QUEUED, 151, 152),
        ("code2wav", COMPUTE, 152, 158),
        ("code2wav", TRANSPORT, 158, 161),  # 2 ms the call's, 1 ms until it was sent on
    ]
    stage, kind, share = bound_by(path.first_output)
    assert (stage, kind) == ("code2wav", WAITING) and share == pytest.approx(100 / 161)


def test_a_streamed_stages_end_waits_for_each_chunk() -> None:
    path = critical_path([THINKER, TALKER, CODE2WAV])
    assert path.total_s == pytest.approx(0.312)
    assert plain(path.end_to_end)[7:] == [
        ("code2wav", WAITING, 50, 150),
        ("code2wav", HANDOFF, 150, 151),
        ("code2wav", QUEUED, 151, 152),
        ("code2wav", COMPUTE, 152, 166),
        ("code2wav", TRANSPORT, 166, 170),
        ("code2wav", WAITING, 170, 250),  # chunk 1 was cut 80 ms after chunk 0 ended
        ("code2wav", HANDOFF, 250, 251),
        ("code2wav", COMPUTE, 251, 263),
        ("code2wav", TRANSPORT, 263, 265),
        ("code2wav", WAITING, 265, 301),  # the last, short chunk: cut when the talker ended
        ("code2wav", HANDOFF, 301, 302),
        ("code2wav", QUEUED, 302, 302.5),
        ("code2wav", COMPUTE, 302.5, 309),
        ("code2wav", TRANSPORT, 309, 312),
    ]
    assert plain(path.end_to_end)[:7] == plain(path.first_output)[:7]
    waited = sum(s.seconds for s in path.end_to_end if s.kind == WAITING)
    assert waited == pytest.approx(0.216)


def test_the_thinker_bounds_first_output_when_it_is_slow() -> None:
    thinker = span(
        "thinker", 0, 0, 30, 900, handoff_s=0.0001, queue_time_s=0.010, stage_time_s=0.880,
        stage_first_output_s=0.025,
    )  # fmt: skip
    talker = span(
        "talker", 1, 905, 925, 1000, handoff_s=0.005, queue_time_s=0.001, stage_time_s=0.090,
        stage_first_output_s=0.018,
    )  # fmt: skip
    path = critical_path([thinker, talker])
    assert_tiles(path)
    assert path.start_unix_ns == at(-0.1)  # the first stage's start, less its hand-off
    assert plain(path.first_output) == [
        ("thinker", HANDOFF, -0.1, 0),
        ("thinker", QUEUED, 0, 10),
        ("thinker", COMPUTE, 10, 880),
        ("thinker", TRANSPORT, 880, 900),
        ("talker", HANDOFF, 900, 905),
        ("talker", QUEUED, 905, 906),
        ("talker", COMPUTE, 906, 923),
        ("talker", TRANSPORT, 923, 925),
    ]
    stage, kind, share = bound_by(path.first_output)
    assert (stage, kind) == ("thinker", COMPUTE) and share == pytest.approx(870 / 925.1)
    assert plain(path.end_to_end)[-3:] == [
        ("talker", QUEUED, 905, 906),
        ("talker", COMPUTE, 906, 995),
        ("talker", TRANSPORT, 995, 1000),
    ]


def test_overlapping_stages_count_each_moment_once() -> None:
    """The talker started (80 ms) before the thinker's span ended (100 ms): the overlap is the
    talker's, and the thinker's call is cut short there, from its transport back."""
    thinker = span("thinker", 0, 0, 20, 100, queue_time_s=0.005, stage_time_s=0.090)
    talker = span("talker", 1, 80, 95, 150, stage_time_s=0.060, stage_first_output_s=0.012)
    path = critical_path([thinker, talker])
    assert_tiles(path)
    assert plain(path.end_to_end) == [
        ("thinker", QUEUED, 0, 5),
        ("thinker", COMPUTE, 5, 80),  # its compute ran to 90 ms; from 80 ms the talker's
        ("talker", COMPUTE, 80, 140),
        ("talker", TRANSPORT, 140, 150),
    ]
    assert plain(path.first_output)[-2:] == [
        ("talker", COMPUTE, 80, 92),
        ("talker", TRANSPORT, 92, 95),
    ]


def test_chunk_calls_that_run_side_by_side() -> None:
    """Chunk 1 ran while chunk 0 still streamed back (two calls in flight): chunk 0's call
    is cut where chunk 1's began, and nothing waited."""
    upstream = span("talker", 0, 0, 5, 40, stage_time_s=0.040, stage_first_output_s=0.005)
    streamed = span(
        "code2wav", 1, 12, 20, 90,
        chunks=(
            chunk(10, 12, 20, 60, own=46, own_first=8),
            chunk(30, 40, 62, 88, own=44),
        ),
    )  # fmt: skip
    path = critical_path([upstream, streamed])
    assert_tiles(path)
    assert plain(path.end_to_end) == [
        ("talker", COMPUTE, 0, 5),
        ("code2wav", WAITING, 5, 10),
        ("code2wav", HANDOFF, 10, 12),
        ("code2wav", COMPUTE, 12, 84),  # chunk 0 from 12 ms, chunk 1 from 40 ms
        ("code2wav", TRANSPORT, 84, 90),
    ]


def test_spans_of_an_older_report_without_the_stages_own_times() -> None:
    """No stage time recorded: the call is compute, less its queue, with no transport."""
    old = {k: v for k, v in asdict(THINKER).items() if k not in ("stage_time_s", "chunks")}
    old.pop("stage_first_output_s")
    read = span_from_mapping(old)
    assert read.stage_time_s == 0.0 and read.chunks == ()
    path = critical_path([read])
    assert plain(path.end_to_end) == [("thinker", QUEUED, 0, 1), ("thinker", COMPUTE, 1, 40)]
    assert span_from_mapping(asdict(CODE2WAV)) == CODE2WAV  # chunks survive report.json


def test_only_requests_that_passed_every_stage_have_a_path() -> None:
    def copy(s: RequestSpan, request_id: str) -> RequestSpan:
        return RequestSpan(**(asdict(s) | {"request_id": request_id, "chunks": s.chunks}))

    spans = [THINKER, TALKER, CODE2WAV, copy(TALKER, "begun-before"), copy(THINKER, "failed")]
    chains, skipped = request_chains(spans)
    assert list(chains) == ["r1"] and skipped == 2
    (path,) = critical_paths(spans)
    assert path.request_id == "r1"


def test_the_runner_records_each_chunk_call_of_a_streamed_stage() -> None:
    pipeline = parse_pipeline(
        "stages:\n"
        "  - {name: talker, address: fake:1}\n"
        "  - {name: code2wav, address: fake:2, input: {processor: token_ids, stream_chunk: 4}}\n"
    )
    pool = FakePool(talker=FakeStage("talker"), code2wav=FakeStage("code2wav"))
    done: list[StageEvent] = []
    runner = PipelineRunner(pipeline, pool, on_stage_done=done.append)  # type: ignore[arg-type]

    async def run() -> None:
        async for _ in runner.run(GenerateInput(request_id="r1", prompt="hi")):
            pass

    asyncio.run(run())
    timing = done[1].timing
    assert timing is not None and len(timing.chunks) == 3  # 10 tokens in chunks of 4
    for before, c in zip(timing.chunks, timing.chunks[1:], strict=False):
        assert c.ready_unix_ns >= before.ready_unix_ns
    for c in timing.chunks:
        assert c.ready_unix_ns <= c.start_unix_ns <= c.first_output_unix_ns <= c.end_unix_ns
    assert timing.start_unix_ns == timing.chunks[0].start_unix_ns
