"""Engine steps in a request's compute (omnistage.traces.steps): each step's time, on the
orchestrator's clock, is split among the requests whose compute segments on the stage cover
it, moment by moment; step time outside every compute segment goes to nobody."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from omnistage.traces.clock import ClockEstimate
from omnistage.traces.critical import COMPUTE, QUEUED, WAITING
from omnistage.traces.critical_report import critical_section
from omnistage.traces.report import rebuild_report, write_session
from omnistage.traces.spans import RequestSpan
from omnistage.traces.steps import Intervals, with_steps
from omnistage.types import (
    CriticalSegment,
    ProfileReport,
    RequestCriticalPath,
    StageProfileResult,
    StageStepTime,
)

T0 = 1_700_000_000_000_000_000
MS = 1_000_000


def at(ms: float) -> int:
    return T0 + round(ms * MS)


def steps(*pairs: tuple[float, float]) -> Intervals:
    """Step intervals given in ms after T0, as the merge keeps them: orchestrator unix µs."""
    return (
        np.array([at(a) / 1e3 for a, _ in pairs], dtype=np.float64),
        np.array([at(b) / 1e3 for _, b in pairs], dtype=np.float64),
    )


def path(rid: str, *segments: tuple[str, str, float, float]) -> RequestCriticalPath:
    segs = tuple(CriticalSegment(stage, kind, at(a), at(b)) for stage, kind, a, b in segments)
    start, end = segs[0].start_unix_ns, segs[-1].end_unix_ns
    return RequestCriticalPath(rid, start, end, end, segs, segs)


def ns(record: StageStepTime) -> tuple[str, int, object, object]:
    """A record, its step times compared to within a µs: the merge keeps the steps in unix
    µs as floats, which hold a quarter of a µs at today's dates."""
    approx = pytest.approx
    return (record.stage, record.compute_ns, approx(record.step_ns, abs=1000),
            approx(record.step_share_ns, abs=1000))  # fmt: skip


def one_span(rid: str, stage: str, replica: str = "") -> RequestSpan:
    return RequestSpan(rid, stage, 0, replica, at(0), at(0), at(0), 0.0, 0.0)


def test_two_overlapping_requests_share_a_step_half_and_half() -> None:
    r1 = path("r1", ("talker", QUEUED, 0, 10), ("talker", COMPUTE, 10, 110))
    r2 = path("r2", ("talker", COMPUTE, 20, 120))
    got = with_steps([r1, r2], {}, {"talker": steps((30, 70))})
    # each was in compute for the whole 40 ms step: each ran in it, each gets half of it
    for found in got:
        (record,) = found.steps
        assert ns(record) == ("talker", 100 * MS, 40 * MS, 20 * MS)


def test_a_step_outside_any_compute_segment_is_attributed_to_nobody() -> None:
    r1 = path("r1", ("talker", WAITING, 0, 50), ("talker", COMPUTE, 50, 100))
    # one step while r1 waited (not in compute), one half inside its compute, one after it
    got = with_steps([r1], {}, {"talker": steps((10, 30), (90, 110), (200, 210))})
    (record,) = got[0].steps
    assert ns(record) == ("talker", 50 * MS, 10 * MS, 10 * MS)
    assert record.rest_ns == pytest.approx(40 * MS, abs=1000)
    assert record.step_fraction == pytest.approx(0.2, abs=1e-4)


def test_a_step_shared_by_three_then_by_one() -> None:
    """Moment by moment: 10 ms of the step with three requests in compute, 20 ms with one."""
    paths = [
        path("a", ("s", COMPUTE, 0, 40)),
        path("b", ("s", COMPUTE, 0, 10)),
        path("c", ("s", COMPUTE, 0, 10)),
    ]
    got = with_steps(paths, {}, {"s": steps((0, 30))})
    third = 10 * MS / 3
    assert [ns(p.steps[0]) for p in got] == [
        ("s", 40 * MS, 30 * MS, third + 20 * MS),
        ("s", 10 * MS, 10 * MS, third),
        ("s", 10 * MS, 10 * MS, third),
    ]


def test_a_stage_without_steps_gets_no_record() -> None:
    r1 = path("r1", ("thinker", COMPUTE, 0, 50), ("code2wav", COMPUTE, 50, 100))
    got = with_steps([r1], {}, {"thinker": steps((0, 25)), "code2wav": steps()})
    assert [s.stage for s in got[0].steps] == ["thinker"]


def test_each_replicas_steps_go_to_the_requests_it_served() -> None:
    r1 = path("r1", ("talker", COMPUTE, 0, 100))
    r2 = path("r2", ("talker", COMPUTE, 0, 100))
    chains = {"r1": [one_span("r1", "talker", "10.0.0.1:50061")],
              "r2": [one_span("r2", "talker", "10.0.0.2:50061")]}  # fmt: skip
    by_key = {
        "talker/10.0.0.1_50061": steps((0, 60)),
        "talker/10.0.0.2_50061": steps((0, 20)),
    }
    got = with_steps([r1, r2], chains, by_key)
    assert [ns(p.steps[0]) for p in got] == [
        ("talker", 100 * MS, 60 * MS, 60 * MS),  # alone on its replica: not shared with r2
        ("talker", 100 * MS, 20 * MS, 20 * MS),
    ]


def test_the_model_steps_column_shows_a_dash_for_an_untraced_stage() -> None:
    r1 = path("r1", ("thinker", COMPUTE, 0, 50), ("code2wav", COMPUTE, 50, 100))
    spans = [one_span("r1", "thinker"), one_span("r1", "code2wav")]
    (traced,) = with_steps([r1], {}, {"thinker": steps((0, 20))})
    row = next(line for line in critical_section([traced], spans) if line.startswith("| r1 "))
    assert row.rstrip(" |").endswith("| thinker 40.0% · code2wav –")
    # a timing-only session: no stage has steps
    row = next(line for line in critical_section([r1], spans) if line.startswith("| r1 "))
    assert row.rstrip(" |").endswith("| –")


def _step_trace(path: Path, base_ns: int, steps_us: list[tuple[float, float]], name: str) -> None:
    events = [
        {"ph": "X", "cat": "user_annotation", "name": name, "pid": 7, "tid": 7, "ts": ts,
         "dur": dur, "args": {}}
        for ts, dur in steps_us
    ]  # fmt: skip
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 7, "tid": 7,
                   "ts": steps_us[0][0] + 1, "dur": 2.0, "args": {}})  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"baseTimeNanoseconds": base_ns, "traceEvents": events}))


def test_the_report_splits_a_vllm_stages_compute_on_the_orchestrators_clock(
    tmp_path: Path,
) -> None:
    """A stage whose host clock runs 5 s ahead: its trace's steps are shifted back by the
    clock estimate, as the merge shifts every event, before they meet the spans. Unshifted,
    they would lie 5 s after the request and count for nothing."""
    offset = 5_000 * MS
    span = RequestSpan("r1", "thinker", 0, "", at(0), at(50), at(100), 0.0, 0.0,
                       stage_time_s=0.1, stage_first_output_s=0.05)  # fmt: skip
    # on the stage's clock: steps 10-40 ms and 60-70 ms after T0, one at 150-160 ms
    base = T0 + offset
    _step_trace(
        tmp_path / "thinker" / "h_1.pt.trace.json",
        base,
        [(10_000.0, 30_000.0), (60_000.0, 10_000.0), (150_000.0, 10_000.0)],
        "execute_context_1(12)_generation_0(0)",
    )
    report = ProfileReport("s", str(tmp_path), (StageProfileResult("thinker", "h:1", True),))
    clocks = {"thinker": ClockEstimate(offset, 1000, 2000, 8)}
    write_session(tmp_path, report, spans=[span], clocks=clocks)
    files = rebuild_report(tmp_path)
    (found,) = files.critical_paths
    assert [ns(s) for s in found.steps] == [("thinker", 100 * MS, 40 * MS, 40 * MS)]
    text = files.summary.read_text()
    assert "| thinker 40.0% |" in text
    assert "| thinker | 40.0% | 40.0% | 40.0% | 40.0% |" in text
    # report.json now holds the split too, and keeps everything else it held
    saved = json.loads((tmp_path / "report.json").read_text())
    (path,) = saved["critical_paths"]
    assert path["steps"] == [asdict(s) for s in found.steps] and path["steps"][0]["step_ns"]
    assert saved["session_id"] == "s" and len(saved["spans"]) == 1 and "thinker" in saved["clocks"]
    assert not list(tmp_path.glob(".*partial"))
    before = (tmp_path / "report.json").stat().st_mtime_ns
    rebuild_report(tmp_path)  # rebuilt again: nothing changed, nothing rewritten
    assert (tmp_path / "report.json").stat().st_mtime_ns == before
