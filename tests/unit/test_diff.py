"""`omnistage profile diff A B` and `diff_sessions` (omnistage.traces.diff), on real traces."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from omnistage import cli
from omnistage.traces.diff import SCHEMA, Change, diff_sessions, format_diff
from omnistage.traces.spans import RequestSpan
from tests.unit.trace_factory import (
    Session,
    copy_session,
    make_cuda_stage,
    read_json,
    shared_session,
    write_json,
)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return shared_session(tmp_path_factory)


def _copy(session: Session, target: Path, spans: list[RequestSpan] | None = None) -> Session:
    copy = copy_session(session, target)
    copy.write_report(spans=[asdict(s) for s in (copy.spans if spans is None else spans)])
    return copy


@pytest.fixture()
def a(session: Session, tmp_path: Path) -> Session:
    return _copy(session, tmp_path / "a")


def _changes(data: Any) -> Iterator[dict[str, Any]]:
    """Every Change in a diff's JSON form."""
    if isinstance(data, dict):
        if data.keys() == {"a", "b", "delta", "pct"}:
            yield data
        for value in data.values():
            yield from _changes(value)
    elif isinstance(data, list):
        for item in data:
            yield from _changes(item)


def _dilate(trace: Path, factor: float) -> None:
    """Make every event of the trace last `factor` times as long, and start as much later
    from the trace's first event: the same run, `factor` times slower."""
    data = read_json(trace)
    timed = [e for e in data["traceEvents"] if e.get("ph") != "M" and "ts" in e]
    origin = min(e["ts"] for e in timed)
    for event in timed:
        event["ts"] = origin + (event["ts"] - origin) * factor
        if "dur" in event:
            event["dur"] *= factor
    write_json(trace, data)


def _stretch(span: RequestSpan, factor: int) -> RequestSpan:
    took = span.end_unix_ns - span.start_unix_ns
    first = span.first_output_unix_ns - span.start_unix_ns
    return replace(
        span,
        end_unix_ns=span.start_unix_ns + took * factor,
        first_output_unix_ns=span.start_unix_ns + first * factor,
    )


def test_a_session_against_itself_is_all_zeros(a: Session) -> None:
    diff = diff_sessions(a.dir, a.dir)
    assert diff.schema == SCHEMA and diff.a == diff.b
    assert [s.stage for s in diff.stages] == ["thinker", "talker"]
    assert diff.stages_only_in_a == diff.stages_only_in_b == ()
    changes = list(_changes(diff.to_json()))
    assert len(changes) > 40
    for c in changes:
        assert c["a"] == c["b"] and c["delta"] in (0.0, None) and c["pct"] in (0.0, None)
    for stage in diff.stages:
        assert stage.ops and stage.ops_per == "request" and stage.units == Change(3, 3, 0, 0)
        assert stage.busy_share.a is not None and 0 < stage.busy_share.a < 1
    text = format_diff(diff)
    assert "per request (3 in A, 3 in B)" in text
    assert "+100" not in text and "-0." not in text


def test_a_slower_stage_shows_with_its_sign_and_change(
    session: Session, a: Session, tmp_path: Path
) -> None:
    spans = [_stretch(s, 2) if s.stage == "talker" else s for s in session.spans]
    b = _copy(session, tmp_path / "b", spans)
    _dilate(b.stages["talker"].trace, 2.0)
    diff = diff_sessions(a.dir, b.dir, top=5)
    thinker, talker = diff.stages
    for latency in (talker.latency_p50_us, talker.latency_p90_us):
        assert latency.delta is not None and latency.delta > 0
        assert latency.pct == pytest.approx(100.0, abs=0.01)
    assert talker.busy_share.delta is not None and talker.busy_share.delta > 0
    assert len(talker.ops) == 5
    for op in talker.ops:  # every op took twice as long, as often, per request
        assert op.self_cpu_us.pct == pytest.approx(100.0, rel=1e-6)
        assert op.calls.delta == 0
    # the thinker did the same work; the profiled window around it grew
    assert thinker.latency_p50_us.delta == 0
    assert all(op.self_cpu_us.delta == 0 for op in thinker.ops)
    assert thinker.busy_share.delta is not None and thinker.busy_share.delta < 0
    assert diff.latency_p50_us.delta is not None and diff.latency_p50_us.delta > 0
    talker_text = format_diff(diff).split("Stage talker", 1)[1]
    assert talker_text.count("+100.0%") >= 7  # p50, p90 and the five ops


def _add_steps(trace: Path, steps: int) -> None:
    """`steps` torch-engine step annotations, after every other event, on a thread of their own."""
    data = read_json(trace)
    events = data["traceEvents"]
    end = max(e["ts"] + e.get("dur", 0) for e in events if "ts" in e)
    events += [
        {"ph": "X", "cat": "user_annotation", "name": "omnistage.step batch=1", "pid": 1,
         "tid": 99, "ts": end + 10.0 * (i + 1), "dur": 1.0, "args": {}}
        for i in range(steps)
    ]  # fmt: skip
    write_json(trace, data)


def test_ops_are_per_engine_step_when_both_traces_count_steps(
    session: Session, a: Session, tmp_path: Path
) -> None:
    b = _copy(session, tmp_path / "b")
    _add_steps(a.stages["talker"].trace, 4)
    _add_steps(b.stages["talker"].trace, 8)
    _add_steps(b.stages["thinker"].trace, 2)  # A's thinker counts none: per request
    thinker, talker = diff_sessions(a.dir, b.dir).stages
    assert (talker.ops_per, talker.units) == ("engine step", Change(4, 8, 4, 100))
    assert thinker.ops_per == "request"
    linear = next(op for op in talker.ops if op.name == "aten::linear")
    assert linear.self_cpu_us.pct == pytest.approx(-50.0)  # same work over twice the steps
    assert "per engine step (4 in A, 8 in B)" in format_diff(diff_sessions(a.dir, b.dir))


def test_a_cuda_stage_is_ranked_by_device_time(tmp_path: Path) -> None:
    for name in ("a", "b"):
        _, spans = make_cuda_stage(tmp_path / name / "dit", "dit", 0, start_ns=1_700 * 10**15)
        report = {"spans": [asdict(s) for s in spans]}
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    diff = diff_sessions(tmp_path / "a", tmp_path / "b")
    (dit,) = diff.stages
    assert dit.ops_ranked_by == "self device" and dit.ops_per == "request"
    assert dit.device_busy_share.a is not None and dit.device_busy_share.delta == 0
    # per request: one 120 µs kernel under aten::mm, one 120 µs memcpy under aten::copy_
    assert {op.name: op.self_device_us.a for op in dit.ops[:2]} == {
        "aten::copy_": 120.0,
        "aten::mm": 120.0,
    }
    text = format_diff(diff)
    assert "busy share (device)" in text and "ops by self device time, per request" in text


def test_different_stages_are_named_not_compared(
    session: Session, a: Session, tmp_path: Path
) -> None:
    b = copy_session(session, tmp_path / "b")
    shutil.move(b.dir / "talker", b.dir / "vocoder")
    spans = [replace(s, stage="vocoder") if s.stage == "talker" else s for s in b.spans]
    stages = [{"stage": n, "replica": "", "ok": True, "error": ""} for n in ("thinker", "vocoder")]
    report = {"session_id": "b", "stages": stages, "spans": [asdict(s) for s in spans]}
    (b.dir / "report.json").write_text(json.dumps(report))
    diff = diff_sessions(a.dir, b.dir)
    assert [s.stage for s in diff.stages] == ["thinker"]
    assert (diff.stages_only_in_a, diff.stages_only_in_b) == (("talker",), ("vocoder",))
    text = format_diff(diff)
    assert "Stages only in A: talker\nStages only in B: vocoder\n" in text
    # a timing-only session (spans, no traces): compared where it can be
    timing = tmp_path / "timing"
    timing.mkdir()
    (timing / "report.json").write_text(json.dumps({"spans": [asdict(s) for s in a.spans]}))
    talker = diff_sessions(a.dir, timing).stages[1]
    assert talker.busy_share.b is None and talker.busy_share.delta is None
    assert talker.latency_p50_us.delta == 0 and talker.ops == ()
    assert "no op table" in format_diff(diff_sessions(a.dir, timing))


def test_a_folder_that_is_not_a_session_is_named(
    a: Session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty[/\\]report\.json not found"):
        diff_sessions(a.dir, empty)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        diff_sessions(tmp_path / "gone", a.dir)
    assert cli.main(["profile", "diff", str(a.dir), str(empty)]) == 2
    err = capsys.readouterr().err
    assert "cannot diff the sessions" in err and "report.json not found" in err


def test_the_cli_prints_a_table_or_json(
    a: Session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["profile", "diff", str(a.dir), str(a.dir), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Session diff: delta = B - A, change = delta / A\n")
    assert "Stage thinker" in out and "Stage talker" in out and "busy share (host)" in out
    assert out.count("top 3 ops by self CPU time, per request") == 2
    assert cli.main(["profile", "diff", str(a.dir), str(a.dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == SCHEMA and data["stages_only_in_a"] == []
    talker = data["stages"][1]
    assert talker["stage"] == "talker" and talker["ops_per"] == "request"
    assert set(talker) >= {"busy_share", "latency_p50_us", "latency_p90_us", "ops", "units"}
    assert set(talker["ops"][0]) == {"name", "self_cpu_us", "self_device_us", "calls"}


def test_the_critical_path_split_moves_to_the_slower_stage(
    session: Session, a: Session, tmp_path: Path
) -> None:
    spans = [_stretch(s, 3) if s.stage == "talker" else s for s in session.spans]
    b = _copy(session, tmp_path / "b", spans)
    diff = diff_sessions(a.dir, b.dir)
    thinker, talker = diff.stages
    for stage in (thinker, talker):  # both sessions' requests have complete paths
        assert stage.path_share.a is not None and 0 < stage.path_share.a < 1
        assert stage.path_kinds and set(stage.path_kinds) <= {
            "queued", "compute", "waiting_for_upstream", "handoff", "transport"
        }  # fmt: skip
    assert talker.path_share.delta is not None and talker.path_share.delta > 0
    assert thinker.path_share.delta is not None and thinker.path_share.delta < 0
    assert talker.path_share.a + thinker.path_share.a <= 1.0 + 1e-9
    assert diff.first_output_p50_us.delta is not None and diff.first_output_p50_us.delta > 0
    # the stage's compute grew three times; its share of the path with it
    grown = talker.path_kinds["compute"]
    assert grown.delta is not None and grown.delta > 0
    data = diff.to_json()["stages"][1]
    assert data["path_share"] == asdict(talker.path_share)
    assert set(data["path_kinds"]) == set(talker.path_kinds)
    text = format_diff(diff).split("Stage talker", 1)[1]
    assert "critical path: end to end p50" in text and "first output p50" in text
    assert "model steps" not in text  # these traces count no engine steps


def test_the_model_steps_share_is_compared_where_traces_count_steps(
    session: Session, a: Session, tmp_path: Path
) -> None:
    b = _copy(session, tmp_path / "b")
    for side in (a, b):
        _add_steps(side.stages["talker"].trace, 4)  # after every span: no compute covered
    talker = diff_sessions(a.dir, b.dir).stages[1]
    assert talker.model_steps == Change(0.0, 0.0, 0.0, 0.0)
    assert "model steps in its compute p50" in format_diff(diff_sessions(a.dir, b.dir))
