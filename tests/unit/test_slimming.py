"""Trace slimming (omnistage.traces.slimming): smaller traces, the same op table."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest

from omnistage.traces import OpStat, load_trace, op_stats, slim_copy_path
from omnistage.traces.slimming import (
    VLLM_IDLE_PATTERNS,
    SlimOptions,
    SlimStats,
    slim_events,
    slim_trace_file,
)
from tests.unit.fake_grpc import Aborted, FakeContext, mapped
from tests.unit.trace_factory import IDLE_PATTERN, Session, shared_session, write_json

TOP = 20
AGGRESSIVE = SlimOptions(min_duration_us=5.0, drop_patterns=(*VLLM_IDLE_PATTERNS, IDLE_PATTERN))


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return shared_session(tmp_path_factory)


@pytest.fixture(scope="module")
def trace(session: Session) -> dict[str, Any]:
    return load_trace(session.stages["talker"].trace)


def _top(stats: list[OpStat]) -> dict[str, OpStat]:
    return {s.name: s for s in stats[:TOP]}


def _python_names(events: list[dict[str, Any]]) -> list[str]:
    return [e["name"] for e in events if e.get("cat") == "python_function"]


@pytest.mark.parametrize(
    "options",
    [SlimOptions(), SlimOptions(min_duration_us=1.0), AGGRESSIVE],
    ids=["vllm-idle", "1us", "aggressive"],
)
def test_the_top_op_table_is_unchanged(trace: dict[str, Any], options: SlimOptions) -> None:
    full = _top(op_stats(trace))
    kept, stats = slim_events(trace["traceEvents"], options)
    slim = _top(op_stats({"traceEvents": kept}))
    assert stats.events_before == len(trace["traceEvents"]) > stats.events_after == len(kept)
    assert list(slim) == list(full)
    for name, op in full.items():
        assert slim[name].calls == op.calls, name
        assert slim[name].self_cpu_us == pytest.approx(op.self_cpu_us, rel=0.01), name
        assert slim[name].total_cpu_us == pytest.approx(op.total_cpu_us, rel=0.01), name


def test_idle_frames_go_with_their_callees_and_ops_stay(trace: dict[str, Any]) -> None:
    events = trace["traceEvents"]
    before = _python_names(events)
    assert any(n.endswith(": idle_wait") for n in before)
    assert any(n.endswith(": idle_check") for n in before)
    assert "<built-in function sched_yield>" in before
    kept, stats = slim_events(events, AGGRESSIVE)
    after = _python_names(kept)
    # idle_check is no pattern: it goes because it is called by idle_wait
    assert not [n for n in after if n.endswith((": idle_wait", ": idle_check"))]
    assert "<built-in function sched_yield>" not in after
    short = [e for e in kept if e.get("cat") == "python_function" and e["dur"] < 5.0]
    assert short == []
    for cat in ("cpu_op", "user_annotation", "Trace"):
        assert sum(e.get("cat") == cat for e in kept) == sum(e.get("cat") == cat for e in events)
    metadata = [e for e in events if e.get("ph") in ("M", "i")]
    assert [e for e in kept if e.get("ph") in ("M", "i")] == metadata
    assert stats.flow_events_dropped == 0
    assert sum(e.get("cat") == "ac2g" for e in kept) == 2


def test_the_default_keeps_the_python_stack_of_the_work(trace: dict[str, Any]) -> None:
    kept, _ = slim_events(trace["traceEvents"], SlimOptions())
    after = _python_names(kept)
    assert any("idle_wait" in n for n in after)  # not a vLLM frame: kept by default
    assert "<built-in function sched_yield>" not in after  # vLLM's spin-wait primitive
    assert any("torch/nn/modules/module.py" in n for n in after)


def test_flows_that_lose_an_end_are_dropped_whole() -> None:
    def x(cat: str, name: str, ts: float, dur: float) -> dict[str, Any]:
        return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": dur}

    def flow(ph: str, ident: int, ts: float, cat: str = "fwdbwd") -> dict[str, Any]:
        return {"ph": ph, "cat": cat, "name": "f", "id": ident, "pid": 1, "tid": 1, "ts": ts}

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "p"}},
        x("python_function", "a.py(1): poll", 0.0, 50.0),
        x("python_function", "a.py(2): inner", 10.0, 5.0),
        x("cpu_op", "aten::mm", 10.0, 5.0),  # shares its start with a dropped frame
        x("cpu_op", "aten::add", 60.0, 5.0),
        x("python_function", "a.py(3): caller", 70.0, 30.0),
        flow("s", 1, 10.0),  # bound to aten::mm, which stays
        flow("f", 1, 60.0) | {"bp": "e"},
        flow("s", 2, 0.0),  # bound to the dropped poll frame
        flow("f", 2, 60.0) | {"bp": "e"},
        flow("s", 3, 70.0),  # never finished
        flow("s", 1, 70.0, cat="other"),  # same id, another category: another flow
        flow("f", 1, 75.0, cat="other"),
    ]
    kept, stats = slim_events(events, SlimOptions(drop_patterns=("*: poll",)))
    names = [e["name"] for e in kept if e["ph"] == "X"]
    assert names == ["aten::mm", "aten::add", "a.py(3): caller"]
    flows = sorted((e["cat"], e["id"], e["ph"]) for e in kept if e["ph"] in "sf")
    assert flows == [("fwdbwd", 1, "f"), ("fwdbwd", 1, "s"), ("other", 1, "f"), ("other", 1, "s")]
    assert stats == SlimStats(events_before=13, events_after=8, flow_events_dropped=3)


def test_slim_trace_file_reports_bytes_saved(
    trace: dict[str, Any], session: Session, tmp_path: Path
) -> None:
    src = session.stages["talker"].trace
    dst = tmp_path / slim_copy_path(src).name
    stats = slim_trace_file(src, dst, AGGRESSIVE)
    assert stats.written and stats.bytes_before == src.stat().st_size
    assert stats.bytes_after == dst.stat().st_size
    assert 0 < stats.bytes_saved < stats.bytes_before and 0 < stats.size_ratio < 1
    slim = load_trace(dst)
    assert len(slim["traceEvents"]) == stats.events_after < stats.events_before
    assert slim["baseTimeNanoseconds"] == trace["baseTimeNanoseconds"]
    assert list(_top(op_stats(slim))) == list(_top(op_stats(trace)))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_copy_that_saves_nothing_is_not_kept(session: Session, tmp_path: Path) -> None:
    src = session.stages["thinker"].frontend
    dst = tmp_path / "copy.slim.pt.trace.json.gz"
    dst.write_bytes(b"stale")
    options = SlimOptions(drop_patterns=(), strip_args=False)
    stats = slim_trace_file(src, dst, options, only_if_smaller=True)
    assert not stats.written and not dst.exists()
    assert stats.bytes_after == stats.bytes_before == src.stat().st_size
    assert stats.events_after == stats.events_before


def test_bad_options_and_paths() -> None:
    with pytest.raises(ValueError, match="min_duration_us must be ≥ 0"):
        SlimOptions(min_duration_us=-1.0)
    with pytest.raises(ValueError, match="cannot replace it"):
        slim_trace_file(Path("a.pt.trace.json.gz"), Path("a.pt.trace.json.gz"), SlimOptions())
    assert slim_copy_path(Path("d/rank0.1.pt.trace.json.gz")) == Path(
        "d/rank0.1.slim.pt.trace.json.gz"
    )
    assert slim_copy_path(Path("d/rank0.1.pt.trace.json")) == Path(
        "d/rank0.1.slim.pt.trace.json.gz"
    )
    slim = Path("d/rank0.1.slim.pt.trace.json.gz")
    assert slim_copy_path(slim) == slim


def test_totals_add_up() -> None:
    total = SlimStats.total(
        [SlimStats(10, 4, 1, 100, 40, args_removed=3), SlimStats(5, 5, 0, 50, 50)]
    )
    assert total == SlimStats(15, 9, 1, 150, 90, args_removed=3)
    assert (total.events_dropped, total.bytes_saved, total.size_ratio) == (6, 60, 0.6)


def _without_stacks(trace: dict[str, Any], *, flows: bool = True) -> dict[str, Any]:
    """The trace as recorded without Python stacks (the default): no Python frames."""
    events = [
        e
        for e in trace["traceEvents"]
        if e.get("cat") != "python_function" and (flows or e.get("cat") != "ac2g")
    ]
    return {**trace, "traceEvents": events}


def _arg_names(events: list[dict[str, Any]]) -> set[str]:
    return {k for e in events if isinstance(e.get("args"), dict) for k in e["args"]}


def test_stripping_args_keeps_the_op_table_exactly(trace: dict[str, Any]) -> None:
    plain = _without_stacks(trace, flows=False)
    before = copy.deepcopy(plain["traceEvents"])
    assert {"Record function id", "Ev Idx", "External id"} <= _arg_names(before)
    kept, stats = slim_events(plain["traceEvents"], SlimOptions())
    assert plain["traceEvents"] == before  # the input is left alone
    assert stats.events_dropped == 0 and stats.args_removed > 0
    assert not {"Record function id", "Ev Idx", "External id"} & _arg_names(kept)
    assert op_stats({"traceEvents": kept}) == op_stats(plain)
    # with ac2g flows (a kernel's link to its op), External id stays
    linked = _without_stacks(trace)
    kept, _ = slim_events(linked["traceEvents"], SlimOptions())
    names = _arg_names(kept)
    assert "External id" in names and not {"Record function id", "Ev Idx"} & names
    assert op_stats({"traceEvents": kept}) == op_stats(linked)


@pytest.mark.parametrize("device_cat", ["kernel", "gpu_memcpy", "cuda_runtime", "cuda_driver"])
def test_external_id_stays_where_device_work_is_linked(device_cat: str) -> None:
    def x(cat: str, name: str, ts: float, dur: float, pid: int, **args: Any) -> dict[str, Any]:
        return dict(ph="X", cat=cat, name=name, pid=pid, tid=1, ts=ts, dur=dur, args=args)

    events = [
        x("cpu_op", "aten::mm", 0.0, 50.0, 1, **{"External id": 4, "Ev Idx": 0}),
        x("cpu_op", "aten::add", 60.0, 10.0, 1, **{"External id": 5, "Record function id": 0}),
        x(device_cat, "work", 20.0, 40.0, 0, correlation=9, **{"External id": 4}),
    ]
    kept, stats = slim_events(events, SlimOptions())
    assert [e["args"].get("External id") for e in kept] == [4, 5, 4]
    assert stats.args_removed == 2
    assert op_stats({"traceEvents": kept}) == op_stats({"traceEvents": events})
    kept, stats = slim_events(events, SlimOptions(strip_args=False))
    assert kept == events and stats.args_removed == 0


def test_a_trace_without_stacks_gets_smaller(trace: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "rank0.1.pt.trace.json.gz"
    write_json(src, _without_stacks(trace, flows=False))
    stats = slim_trace_file(src, slim_copy_path(src), SlimOptions(), only_if_smaller=True)
    assert stats.written and stats.events_dropped == 0
    assert 0 < stats.bytes_after < stats.bytes_before
    assert op_stats(load_trace(slim_copy_path(src))) == op_stats(load_trace(src))


def test_the_default_patterns_drop_tiny_frames_not_ops(trace: dict[str, Any]) -> None:
    kept, _ = slim_events(trace["traceEvents"], SlimOptions())
    full = _python_names(trace["traceEvents"])
    slim = _python_names(kept)
    for name in ("__getattr__", "_get_tracing_state", "<built-in function isinstance>"):
        assert any(name in n for n in full) and not any(name in n for n in slim), name
    assert op_stats({"traceEvents": kept}) == op_stats(trace)


class _Profiler:
    def __init__(self) -> None:
        self.slim: list[SlimOptions | None] = []

    async def stop(
        self, keys: list[str], output_dir: str, *, slim: SlimOptions | None = None
    ) -> Any:
        from omnistage.types import ProfileReport

        self.slim.append(slim)
        return ProfileReport(session_id="s", output_dir=output_dir, stages=())


def _stop_over_grpc(**fields: Any) -> tuple[_Profiler, FakeContext]:
    """StopProfile through the orchestrator's servicer, with these request fields."""

    from omnistage.v1 import orchestrator_pb2
    from orchestrator.config import parse_pipeline
    from orchestrator.servicer import OrchestratorServicer

    profiler, context = _Profiler(), FakeContext()
    servicer = OrchestratorServicer(
        pipeline=parse_pipeline("stages:\n  - {name: a, address: 'h:1'}\n"),
        pool=None,  # type: ignore[arg-type]
        runner=None,  # type: ignore[arg-type]
        profiler=profiler,  # type: ignore[arg-type]
        sessions=None,  # type: ignore[arg-type]
    )
    request = orchestrator_pb2.PipelineStopProfileRequest(output_dir="out", **fields)

    body = servicer.StopProfile(request, context)  # type: ignore[arg-type]
    with contextlib.suppress(Aborted):
        asyncio.run(mapped(context, "StopProfile", body))
    return profiler, context


def test_stop_profile_hands_the_requests_slimming_to_the_profiler() -> None:
    profiler, context = _stop_over_grpc()
    assert context.status is None and profiler.slim == [None]  # not asked: no slimming
    profiler, _ = _stop_over_grpc(slim=True)
    assert profiler.slim == [SlimOptions()]  # the defaults: vLLM's idle loops
    profiler, _ = _stop_over_grpc(slim_min_duration_us=2.5, slim_patterns=[IDLE_PATTERN])
    assert profiler.slim == [SlimOptions(min_duration_us=2.5, drop_patterns=(IDLE_PATTERN,))]


def test_a_negative_slimming_threshold_is_invalid_argument() -> None:
    import grpc

    profiler, context = _stop_over_grpc(slim_min_duration_us=-1.0)
    assert profiler.slim == []  # refused before the profiler was asked to stop anything
    assert context.status is not None
    code, message = context.status
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_duration_us must be ≥ 0 (got -1.0)" in message
