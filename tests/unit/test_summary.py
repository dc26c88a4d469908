"""summary.md (omnistage.traces.summary) and the whole rebuild (omnistage.traces.report)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from omnistage.traces import RequestSpan, load_trace, op_stats
from omnistage.traces.clock import ClockEstimate
from omnistage.traces.critical import critical_paths
from omnistage.traces.report import ReportFiles, read_session, rebuild_report
from omnistage.traces.slimming import SlimOptions
from omnistage.traces.summary import write_summary
from omnistage.traces.units import ms
from omnistage.types import ProfileSlimming
from tests.unit.trace_factory import (
    IDLE_PATTERN,
    Session,
    copy_session,
    read_json,
    shared_session,
)

CLOCKS = {
    "thinker": {"offset_ns": 1_250_000, "error_ns": 40_000, "rtt_ns": 80_000, "samples": 5},
    "talker": {"offset_ns": 0, "error_ns": 35_000, "rtt_ns": 70_000, "samples": 5},
}
FAILED = {
    "stage": "vocoder",
    "replica": "127.0.0.1:50063",
    "ok": False,
    "error": "UnavailableError: stage 'vocoder' is down",
}


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return shared_session(tmp_path_factory)


@pytest.fixture()
def fresh(session: Session, tmp_path: Path) -> Session:
    fresh = copy_session(session, tmp_path / session.dir.name)
    fresh.write_report()
    report = json.loads((fresh.dir / "report.json").read_text())
    report["stages"].append(FAILED)
    report["clocks"] = CLOCKS
    report["spans"] = [asdict(s) for s in fresh.spans]
    (fresh.dir / "report.json").write_text(json.dumps(report))
    return fresh


def _section(text: str, title: str) -> str:
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert match, f"no section {title!r} in:\n{text}"
    return match.group(1)


def _row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def test_rebuild_writes_timeline_and_summary(fresh: Session) -> None:
    messages: list[str] = []
    files = rebuild_report(fresh.dir, progress=messages.append)
    assert files == ReportFiles(
        fresh.dir / "timeline.json.gz",
        fresh.dir / "summary.md",
        {},
        timelines=(fresh.dir / "timeline.json.gz", fresh.dir / "timeline.pftrace.gz"),
        critical_paths=critical_paths(fresh.spans),  # its traces mark no engine step
    )
    assert files.summary_html == fresh.dir / "summary.html" and files.summary_html.is_file()
    assert any(m.startswith("stage talker: ") for m in messages)
    text = files.summary.read_text()
    assert text.startswith(f"# Profile session {fresh.dir.name}\n")

    requests = _section(text, "Requests")
    assert "latency p50" in requests and "latency p90" in requests
    for stage, spans in (("thinker", 3), ("talker", 3)):
        row = _row(requests, stage)
        assert row[1] == str(spans)
        p50, p90 = (float(c.split()[0]) for c in row[2:4])
        assert 0 < p50 <= p90
    # the talker sleeps 100 ms per request: it dominates, even on a busy machine
    dominant = re.search(r"\*\*Dominant stage: talker\*\*, with ([\d.]+)% of the time", requests)
    assert dominant and float(dominant.group(1)) > 50
    # which stage was slowest per request, from the spans themselves (a busy machine can
    # make the thinker's first request, with torch's warm-up, the slower one)
    took = {(s.stage, s.request_id): s.end_unix_ns - s.start_unix_ns for s in fresh.spans}
    slowest = sum(took[("talker", r)] > took[("thinker", r)] for r in ("r0", "r1", "r2"))
    assert f"slowest stage of {slowest} of them" in requests

    stages = _section(text, "Stages")
    for stage in ("thinker", "talker"):
        share = _row(stages, stage)[2]
        assert 0 < float(share.rstrip("%")) < 100
        assert f"### {stage}: top 15 ops by self CPU time" in text
    assert "self device" not in text  # a CPU-only profile

    clocks = _section(text, "Clock offsets")
    assert _row(clocks, "thinker")[1:] == ["1.250 ms", "0.040 ms", "0.080 ms", "5"]
    assert "UnavailableError: stage 'vocoder' is down" in _section(text, "Failed stages")
    links = _section(text, "Files")
    for target in (
        "timeline.json.gz",
        "thinker/profiler_out_thinker.txt",
        "talker/profiler_out_talker.txt",
    ):
        assert f"]({target})" in links
        assert (fresh.dir / target).exists()


def test_top_ops_are_those_of_the_op_table(fresh: Session) -> None:
    text = rebuild_report(fresh.dir).summary.read_text()
    section = text.split("### talker: top 15 ops by self CPU time", 1)[1]
    expected = op_stats(load_trace(fresh.stages["talker"].trace))[:3]
    rows = [line for line in section.splitlines() if line.startswith("| `")][:3]
    assert [r.split("`")[1] for r in rows] == [op.name for op in expected]
    assert _row(section, f"`{expected[0].name}`")[1] == str(expected[0].calls)


def test_rebuild_with_slimming_uses_the_slim_copies(fresh: Session) -> None:
    options = SlimOptions(min_duration_us=2.0, drop_patterns=(IDLE_PATTERN,))
    files = rebuild_report(fresh.dir, slim=options)
    total = files.slim_total
    assert total.bytes_saved > 0 and total.events_dropped > 0
    timeline = read_json(files.timeline)
    used = [t["file"] for t in timeline["metadata"]["traces"]]
    assert all(".slim." in f for f in used if "rank0" in f)
    for rel, stats in files.slim_stats.items():
        original = fresh.dir / rel
        assert original.exists()  # never modified
        copy = original.with_name(original.name.replace(".pt.trace", ".slim.pt.trace"))
        assert copy.exists() == stats.written
    files_section = _section(files.summary.read_text(), "Files")
    assert ".slim.pt.trace.json.gz):" in files_section
    assert f"**{total.bytes_saved:,} bytes saved** ({total.bytes_before / 1e6:.1f} MB" in (
        files_section
    )
    assert f"size ratio {total.size_ratio:.2f}" in files_section
    assert "torch_profiler_with_stack" not in files_section
    slimming = files.slimming()
    assert slimming is not None and slimming.bytes_saved == total.bytes_saved
    assert slimming.events_before == total.events_before and slimming.traces == 4
    # the op tables are those of the originals
    again = write_summary(
        fresh.dir,
        report={"stages": []},
        spans=[],
        clocks={},
    ).read_text()
    assert again.count("top 15 ops by self CPU time") == 2


def test_device_time_appears_where_the_trace_has_it(tmp_path: Path) -> None:
    def ev(cat: str, name: str, ts: float, dur: float, **args: Any) -> dict[str, Any]:
        return {
            "ph": "X",
            "cat": cat,
            "name": name,
            "pid": 5,
            "tid": 5,
            "ts": ts,
            "dur": dur,
            "args": args,
        }

    events = [
        ev("cpu_op", "aten::mm", 0.0, 50.0, **{"External id": 1}),
        ev("cuda_runtime", "cudaLaunchKernel", 10.0, 5.0, correlation=9),
        ev("kernel", "gemm", 20.0, 400.0, correlation=9, **{"External id": 1})
        | {"pid": 0, "tid": 7},
    ]
    (tmp_path / "dit").mkdir()
    trace = {"traceEvents": events, "baseTimeNanoseconds": 1_700_000_000_000_000_000}
    (tmp_path / "dit" / "rank0.1.pt.trace.json").write_text(json.dumps(trace))
    span = RequestSpan(
        "r", "dit", 0, "", 1_700_000_000_000_000_000, 0, 1_700_000_000_000_500_000, 0, 0
    )
    text = write_summary(tmp_path, report={}, spans=[span], clocks={}).read_text()
    assert "### dit: top 15 ops by self device time" in text
    row = _row(text.split("self device time", 1)[1], "`aten::mm`")
    assert row[-2:] == ["0.400 ms", "100.0%"]
    assert _row(_section(text, "Stages"), "dit")[3] == "0.400 ms"  # device busy
    assert "| dit | no estimate: 0 assumed |" in text
    assert "**Dominant stage: dit**" in text


def test_a_session_without_traces_or_spans(tmp_path: Path) -> None:
    text = write_summary(tmp_path, report={"stages": [FAILED]}, spans=[], clocks={}).read_text()
    assert "No trace was read." in text
    assert "No request spans were recorded" in text
    assert "stages profiled: 1 (1 failed)" in text


def test_read_session_checks_report_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="session folder"):
        read_session(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_session(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"spans": [{"stage": "a"}]}))
    with pytest.raises(ValueError, match=r"spans\[0\] is malformed"):
        read_session(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"clocks": {"a": {"offset_ns": 1}}}))
    with pytest.raises(ValueError, match=r"clocks\['a'\] is malformed"):
        read_session(tmp_path)
    (tmp_path / "report.json").write_text(
        json.dumps({"stages": [{"stage": "b"}, {"stage": "a"}], "clocks": CLOCKS})
    )
    record = read_session(tmp_path)
    assert record.spans == () and record.stage_order() == {"b": 0, "a": 1}
    assert record.clocks["thinker"] == ClockEstimate(1_250_000, 40_000, 80_000, 5)


def test_the_summary_says_when_slimming_saved_nothing(fresh: Session) -> None:
    files = rebuild_report(fresh.dir, slim=SlimOptions(drop_patterns=(), strip_args=False))
    section = _section(files.summary.read_text(), "Files")
    assert "**0 bytes saved**" in section
    assert "`torch_profiler_with_stack: true`" in section
    assert files.slimming() == ProfileSlimming(
        bytes_before=files.slim_total.bytes_before,
        bytes_after=files.slim_total.bytes_before,
        events_before=files.slim_total.events_before,
        events_after=files.slim_total.events_before,
        traces=4,
        copies_written=0,
    )
    # without slimming, nothing is said about it
    files = rebuild_report(fresh.dir)
    assert files.slimming() is None
    assert "bytes saved" not in files.summary.read_text()


def test_report_json_is_written_and_read_from_the_same_dataclasses(tmp_path: Path) -> None:
    from omnistage.traces.clock import ClockEstimate
    from omnistage.traces.report import read_session, write_session
    from omnistage.traces.spans import RequestSpan
    from omnistage.types import ProfileReport, StageProfileResult

    report = ProfileReport("s1", str(tmp_path), (StageProfileResult("a", "h:1", True),))
    span = RequestSpan("r1", "a", 0, "h:1", 10, 20, 30, 0.5, 0.25)
    clock = ClockEstimate(offset_ns=-7, error_ns=3, rtt_ns=6, samples=10)
    write_session(tmp_path, report, spans=[span], clocks={"a": clock})
    record = read_session(tmp_path)
    assert record.spans == (span,) and record.clocks == {"a": clock}
    assert record.report["session_id"] == "s1" and record.stage_order() == {"a": 0}


def test_the_critical_path_section_splits_each_request(fresh: Session) -> None:
    """The factory's stages run one after the other, neither reporting its own time: each
    request's path is the thinker's call, the hand-off (until the talker took it up), and the
    talker's call, each call queued for its queue time and compute for the rest."""
    text = rebuild_report(fresh.dir).summary.read_text()
    section = _section(text, "Critical path")
    spans = {(s.stage, s.request_id): s for s in fresh.spans}
    shares: dict[tuple[str, str], list[float]] = {}
    talker_shares = []  # of the end-to-end time: its hand-off and its call
    for rid in ("r0", "r1", "r2"):
        thinker, talker = spans[("thinker", rid)], spans[("talker", rid)]
        start = thinker.start_unix_ns  # the thinker's hand-off is 0
        queued = round(thinker.queue_time_s * 1e9) + round(talker.queue_time_s * 1e9)
        parts = {
            ("thinker", "queued"): round(thinker.queue_time_s * 1e9),
            ("thinker", "compute"): thinker.end_unix_ns - start - round(thinker.queue_time_s * 1e9),
            ("talker", "hand-off"): talker.start_unix_ns - thinker.end_unix_ns,
            ("talker", "queued"): round(talker.queue_time_s * 1e9),
            ("talker", "compute"): talker.first_output_unix_ns
            - talker.start_unix_ns
            - round(talker.queue_time_s * 1e9),
        }
        first = talker.first_output_unix_ns - start
        assert sum(parts.values()) == first
        for key, ns in parts.items():
            shares.setdefault(key, []).append(ns / first)
        row = _row(section, rid)
        assert row[1] == ms(first / 1e3)  # µs: 1.099 s, 98.933 ms
        assert row[4] == ms((talker.end_unix_ns - start) / 1e3)
        (stage, kind), most = max(parts.items(), key=lambda item: item[1])
        assert row[2] == f"{stage} · {kind} ({100 * most / first:.1f}%)"
        compute = parts[("thinker", "compute")] + parts[("talker", "compute")]
        split = [
            f"queued {100 * queued / first:.1f}%",
            f"compute {100 * compute / first:.1f}%",
            f"hand-off {100 * parts[('talker', 'hand-off')] / first:.1f}%",
        ]
        assert row[3] == " · ".join(split)
        total = talker.end_unix_ns - start
        talker_shares.append((talker.end_unix_ns - thinker.end_unix_ns) / total)
    end_p50 = sorted(talker_shares)[1]
    assert _row(section, "stage talker")[3] == f"{100 * end_p50:.1f}%"
    (stage, kind), values = max(shares.items(), key=lambda item: sorted(item[1])[1])
    assert kind == "hand-off" and stage == "talker"  # the talker began after every thinker call
    median = f"{100 * sorted(values)[1]:.1f}%"
    assert (
        f"**Bottleneck:** the hand-off to talker (its edge's processor) took {median} of the "
        "time to first output" in section
    )
    assert "(medians over the 3 requests)." in section
