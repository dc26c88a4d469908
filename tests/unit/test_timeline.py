"""The merged timeline (omnistage.traces.timeline) of real torch.profiler traces."""

from __future__ import annotations

import gzip
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest

from omnistage.traces.clock import ClockEstimate
from omnistage.traces.spans import ORCHESTRATOR_PID, RequestSpan, orchestrator_events
from omnistage.traces.timeline import TIMELINE_NAME, build_timeline, find_traces
from tests.unit.trace_checks import (
    flow_problems,
    misplaced_ops,
    nesting_problems,
    request_spans,
    tef_problems,
)
from tests.unit.trace_factory import (
    FLOW_ID,
    REQUESTS,
    Session,
    copy_session,
    read_json,
    shared_session,
    shift_base_time,
)

SHIFT_NS = 3_700_000_000  # the talker host's clock runs 3.7 s ahead
EXACT = ClockEstimate(offset_ns=0, error_ns=0, rtt_ns=0, samples=1)
TOLERANCE_US = 1.0  # torch's and Python's readings of the same wall clock


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return shared_session(tmp_path_factory)


@pytest.fixture()
def fresh(session: Session, tmp_path: Path) -> Session:
    return copy_session(session, tmp_path / session.dir.name)


def _build(session: Session, clocks: dict[str, ClockEstimate], **kw: Any) -> dict[str, Any]:
    path = build_timeline(session.dir, spans=session.spans, clocks=clocks, **kw).path
    assert path == session.dir / TIMELINE_NAME
    data: dict[str, Any] = read_json(path)
    return data


def _process_names(events: list[dict[str, Any]]) -> dict[int, str]:
    return {
        e["pid"]: e["args"]["name"]
        for e in events
        if e["ph"] == "M" and e["name"] == "process_name"
    }


def _pid_of(events: list[dict[str, Any]], name: str) -> int:
    return next(pid for pid, n in _process_names(events).items() if n == name)


def test_merged_file_follows_the_trace_event_format(session: Session, tmp_path: Path) -> None:
    fresh = copy_session(session, tmp_path / "s")
    data = _build(fresh, {"thinker": EXACT, "talker": EXACT})
    events = data["traceEvents"]
    assert data["displayTimeUnit"] == "ms"
    assert tef_problems(events) == []
    assert any(e["ph"] in ("s", "f") for e in events)
    assert all(e["ts"] == 0 for e in events if e["ph"] == "M")
    assert all(e["ts"] >= 0 for e in events)
    orchestrator = [e for e in events if e["pid"] == ORCHESTRATOR_PID]
    assert nesting_problems(orchestrator) == []
    assert flow_problems(events) == []
    # shifted so that the earliest event is at (nearly) 0
    assert min(e["ts"] for e in events if e["ph"] != "M") < 1.0
    meta = data["metadata"]
    first_span = min(s.start_unix_ns for s in fresh.spans)
    assert 0 < first_span - meta["origin_unix_ns"] < 60e9
    assert meta["warnings"] == []


def test_each_stage_and_front_end_is_its_own_sorted_process(session: Session) -> None:
    events = _build(session, {"thinker": EXACT, "talker": EXACT})["traceEvents"]
    names = _process_names(events)
    assert sorted(names.values()) == [
        "orchestrator",
        "talker",
        "talker front end",
        "thinker",
        "thinker front end",
    ]
    assert len(set(names)) == len(names)
    sort_index = {
        e["pid"]: e["args"]["sort_index"]
        for e in events
        if e["ph"] == "M" and e["name"] == "process_sort_index"
    }
    by_name = {name: sort_index[pid] for pid, name in names.items()}
    assert by_name == {
        "orchestrator": -1,
        "thinker": 0,
        "thinker front end": 0,
        "talker": 1,
        "talker front end": 1,
    }
    # tids are kept: the worker's thread is the profiling thread of the original trace
    original = read_json(session.stages["thinker"].trace)["traceEvents"]
    tids = {e["tid"] for e in original if e.get("cat") == "cpu_op"}
    thinker = _pid_of(events, "thinker")
    assert tids <= {e["tid"] for e in events if e["pid"] == thinker}


def test_ops_fall_inside_the_spans_of_their_requests(session: Session) -> None:
    events = _build(session, {"thinker": EXACT, "talker": EXACT})["traceEvents"]
    assert misplaced_ops(events, TOLERANCE_US + session.torch_clock_error_us()) == []


def test_injected_clock_offset_is_recovered(session: Session, fresh: Session) -> None:
    slack_us = TOLERANCE_US + session.torch_clock_error_us()  # before the shift below
    shift_base_time(fresh.stages["talker"].trace, SHIFT_NS)
    shift_base_time(fresh.stages["talker"].frontend, SHIFT_NS)
    # an estimate that is 0.15 ms off, within its stated error of 0.2 ms
    estimate = ClockEstimate(
        offset_ns=SHIFT_NS + 150_000, error_ns=200_000, rtt_ns=400_000, samples=5
    )
    data = _build(fresh, {"thinker": EXACT, "talker": estimate})
    assert misplaced_ops(data["traceEvents"], estimate.error_ns / 1000 + slack_us) == []
    offsets = data["metadata"]["clock_offsets"]
    assert offsets["talker"] == {
        "offset_ns": SHIFT_NS + 150_000,
        "error_ns": 200_000,
        "clock": "talker",
    }

    # without the estimate the talker's ops are 3.7 s away from their requests, and it is said
    data = _build(fresh, {"thinker": EXACT})
    problems = misplaced_ops(data["traceEvents"], 1000.0)
    assert problems and all(p.startswith("talker:") for p in problems)
    assert any("'talker'" in w and "offset" in w for w in data["metadata"]["warnings"])


def test_requests_cross_the_stages_on_the_orchestrator_track(session: Session) -> None:
    events = _build(session, {"thinker": EXACT, "talker": EXACT})["traceEvents"]
    mine = [e for e in events if e["pid"] == ORCHESTRATOR_PID]
    spans = request_spans(events)
    assert len(spans) == 2 * len(REQUESTS)
    # a thread per request and stage, named after both, sorted by request then stage
    threads = {
        e["tid"]: e["args"]["name"] for e in mine if e["ph"] == "M" and e["name"] == "thread_name"
    }
    assert sorted(threads) == list(range(1, 2 * len(REQUESTS) + 1))
    for (stage, request_id), span in spans.items():
        assert threads[span["tid"]] == f"{request_id} · {stage}"
    order = [
        threads[e["tid"]]
        for e in sorted(
            (e for e in mine if e["name"] == "thread_sort_index"),
            key=lambda e: e["args"]["sort_index"],
        )
    ]
    assert order == [f"{r} · {stage}" for r in REQUESTS for stage in ("thinker", "talker")]
    by_id = {s.request_id + s.stage: s for s in session.spans}
    flows: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for ev in mine:
        if ev["ph"] in ("s", "f"):
            flows[ev["id"]][ev["ph"]] = ev
    assert len(flows) == len(REQUESTS)
    for request_id in REQUESTS:
        thinker, talker = spans[("thinker", request_id)], spans[("talker", request_id)]
        assert thinker["args"]["queue_time_s"] == pytest.approx(0.0001)
        assert talker["args"]["handoff_s"] == pytest.approx(0.0005)
        for outer in (thinker, talker):
            (part,) = [
                e
                for e in mine
                if e["ph"] == "X"
                and e["tid"] == outer["tid"]
                and e["name"] == "queued→first output"
            ]
            assert part["ts"] == outer["ts"]
            assert part["ts"] + part["dur"] <= outer["ts"] + outer["dur"] + 0.002
        span = by_id[request_id + "talker"]
        assert talker["dur"] == pytest.approx((span.end_unix_ns - span.start_unix_ns) / 1000)
        # one flow per hop, between two `handoff` marks: one ending where the thinker's output
        # was handed on, one starting where the talker's input arrived
        (flow,) = [f for f in flows.values() if f["s"]["tid"] == thinker["tid"]]
        assert flow["f"]["tid"] == talker["tid"]
        assert flow["f"]["bp"] == "e" and flow["s"]["cat"] == flow["f"]["cat"]
        marks = {e["tid"]: e for e in mine if e["ph"] == "X" and e["name"] == "handoff"}
        left, arrived = marks[thinker["tid"]], marks[talker["tid"]]
        assert arrived["ts"] == talker["ts"]
        handed = talker["ts"] - talker["args"]["handoff_s"] * 1e6
        assert left["ts"] + left["dur"] == pytest.approx(handed, abs=0.002)
        assert left["ts"] <= flow["s"]["ts"] <= left["ts"] + left["dur"]
        assert arrived["ts"] <= flow["f"]["ts"] <= arrived["ts"] + arrived["dur"]
    assert nesting_problems(mine) == []
    assert flow_problems(mine) == []


def _span_at(
    request_id: str, stage: str, index: int, start_ms: float, end_ms: float
) -> RequestSpan:
    ns = 1_000_000
    start, end = int(start_ms * ns), int(end_ms * ns)
    return RequestSpan(request_id, stage, index, "", start, start + (end - start) // 4, end, 0, 0)


def test_streaming_hand_offs_overlap_on_their_own_threads() -> None:
    """code2wav starts on talker's first chunk, long before talker ends (stream_chunk)."""
    spans = [
        _span_at("a", "thinker", 0, 0, 10),
        _span_at("a", "talker", 1, 10.5, 40),
        _span_at("a", "code2wav", 2, 15, 45),  # starts inside talker's span
        _span_at("b", "thinker", 0, 5, 12),
        _span_at("b", "talker", 1, 20, 30),  # starts after thinker ended
        _span_at("b", "code2wav", 2, 20, 20),  # zero length, at talker's start
    ]
    events = msgspec.to_builtins(orchestrator_events(spans, origin_ns=0))
    assert tef_problems(events) == []
    assert nesting_problems(events) == []
    assert flow_problems(events) == []
    stage_spans = {
        (e["args"]["request_id"], e["args"]["stage"]): e
        for e in events
        if e["ph"] == "X" and e["name"].startswith("stage ")
    }
    assert len({e["tid"] for e in stage_spans.values()}) == len(spans)
    flows: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for ev in events:
        if ev["ph"] in ("s", "f"):
            flows[ev["id"]][ev["ph"]] = ev
    marks = [e for e in events if e["ph"] == "X" and e["name"] == "handoff"]

    def mark_of(ev: dict[str, Any]) -> dict[str, Any]:
        (mark,) = [
            m for m in marks if m["tid"] == ev["tid"] and m["ts"] <= ev["ts"] <= m["ts"] + m["dur"]
        ]
        return mark

    # each arrow leaves a mark that ends when the output was handed on, and enters one that
    # starts when the next stage started (handoff_s is 0 here: the same moment)
    left = {(pair["s"]["tid"], pair["f"]["tid"]): mark_of(pair["s"]) for pair in flows.values()}
    arrived = {(pair["s"]["tid"], pair["f"]["tid"]): mark_of(pair["f"]) for pair in flows.values()}
    tid = {key: e["tid"] for key, e in stage_spans.items()}
    for a, b, start_us in (
        (("a", "talker"), ("a", "code2wav"), 15_000.0),  # streaming: inside talker's span
        (("b", "thinker"), ("b", "talker"), 20_000.0),  # after thinker's end
        (("b", "talker"), ("b", "code2wav"), 20_000.0),  # zero length, at talker's start
    ):
        out, into = left[(tid[a], tid[b])], arrived[(tid[a], tid[b])]
        assert out["ts"] + out["dur"] == pytest.approx(start_us, abs=0.002)
        assert into["ts"] == start_us and into["dur"] > 0


def test_flow_ids_of_different_stages_cannot_collide(session: Session) -> None:
    events = _build(session, {"thinker": EXACT, "talker": EXACT})["traceEvents"]
    pid_of = {_pid_of(events, "thinker"): "thinker", _pid_of(events, "talker"): "talker"}
    ids: dict[str, set[int]] = defaultdict(set)
    for ev in events:
        if ev.get("cat") == "ac2g":
            ids[pid_of[ev["pid"]]].add(ev["id"])
    assert len(ids["thinker"]) == len(ids["talker"]) == 1
    assert ids["thinker"] != ids["talker"]
    assert FLOW_ID not in ids["thinker"] | ids["talker"]


def test_replicas_have_their_own_tracks_and_clocks(fresh: Session) -> None:
    talker = fresh.dir / "talker"
    for replica in ("10.0.0.1_50062", "10.0.0.2_50062"):
        (talker / replica).mkdir()
        for trace in talker.glob("*.pt.trace.json.gz"):
            shutil.copy(trace, talker / replica / trace.name)
    for trace in talker.glob("*.pt.trace.json.gz"):
        trace.unlink()
    shift_base_time(next((talker / "10.0.0.1_50062").glob("rank0.*")), SHIFT_NS)
    ahead = ClockEstimate(offset_ns=SHIFT_NS, error_ns=0, rtt_ns=0, samples=1)
    clocks = {"thinker": EXACT, "talker/10.0.0.1:50062": ahead, "talker": EXACT}
    sources = find_traces(fresh.dir)
    assert {s.key for s in sources} == {"thinker", "talker/10.0.0.1_50062", "talker/10.0.0.2_50062"}
    data = _build(fresh, clocks)
    names = set(_process_names(data["traceEvents"]).values())
    assert {"talker/10.0.0.1_50062", "talker/10.0.0.2_50062 front end"} <= names
    offsets = data["metadata"]["clock_offsets"]
    assert offsets["talker/10.0.0.1_50062"]["clock"] == "talker/10.0.0.1:50062"
    assert offsets["talker/10.0.0.2_50062"]["clock"] == "talker"
    # both replicas' copies of the same work land on the same instants
    starts = defaultdict(list)
    for pid, name in _process_names(data["traceEvents"]).items():
        if name.startswith("talker/") and "front end" not in name:
            starts[name] = sorted(
                e["ts"] for e in data["traceEvents"] if e["pid"] == pid and e.get("cat") == "cpu_op"
            )
    first, second = starts.values()
    assert first == pytest.approx(second, abs=0.002)


def test_progress_unreadable_traces_and_no_spans(fresh: Session) -> None:
    (fresh.dir / "thinker" / "broken.pt.trace.json.gz").write_bytes(b"\x1f\x8bnot gzip")
    messages: list[str] = []
    path = build_timeline(fresh.dir, spans=[], clocks={}, progress=messages.append).path
    assert any(m.startswith("stage thinker: ") and m.endswith(" events") for m in messages)
    data = read_json(path)
    warnings = data["metadata"]["warnings"]
    assert any("broken.pt.trace.json.gz skipped" in w for w in warnings)
    assert sum("no clock estimate" in w for w in warnings) == 2
    assert not [e for e in data["traceEvents"] if e["pid"] == ORCHESTRATOR_PID and e["ph"] == "X"]


def test_an_empty_session_gives_an_empty_timeline(tmp_path: Path) -> None:
    span = RequestSpan("r", "a", 0, "", 2_000_000, 2_500_000, 3_000_000, 0.0, 0.0)
    data = read_json(build_timeline(tmp_path, spans=[span], clocks={}).path)
    assert data["metadata"]["origin_unix_ns"] == 2_000_000
    (x,) = [e for e in data["traceEvents"] if e["name"] == "stage a"]
    assert (x["ts"], x["dur"]) == (0.0, 1000.0)


def test_worker_processes_give_what_one_process_gives(
    session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big sessions are merged by worker processes, each trace as two jobs (timeline parts;
    op table and busy time): the files and the stats are those of the in-process merge."""
    clocks = {"thinker": EXACT, "talker": EXACT}
    alone = copy_session(session, tmp_path / "alone" / session.dir.name)
    split = copy_session(session, tmp_path / "split" / session.dir.name)
    one = build_timeline(alone.dir, spans=alone.spans, clocks=clocks)
    monkeypatch.setattr("omnistage.traces.parallel.PARALLEL_BYTES", 0)
    many = build_timeline(split.dir, spans=split.spans, clocks=clocks, workers=2)

    def key(e: dict[str, Any]) -> tuple[Any, ...]:
        return (e["pid"], str(e["tid"]), e["ts"], e["ph"], str(e.get("name")))

    a, b = read_json(one.path), read_json(many.path)
    assert sorted(map(key, a["traceEvents"])) == sorted(map(key, b["traceEvents"]))
    for (_, x), (_, y) in zip(one.traces, many.traces, strict=True):
        assert x.ops == y.ops
        assert (x.first_us, x.last_us) == (y.first_us, y.last_us)
    assert any(x.ops for _, x in many.traces)
    assert gzip.decompress(one.files[1].read_bytes()) == gzip.decompress(many.files[1].read_bytes())
    assert not [p for p in split.dir.rglob("*.part")]
