"""Bad traces in a session: each is named with its problem, every other trace is merged, and
every file stays on disk. The same code runs behind StopProfile and `omnistage profile report`."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from omnistage.traces import TraceError, TraceReader, rebuild_report
from tests.unit.trace_factory import read_json

START_US = 1_000.0
BASE_NS = 1_790_000_000_000_000_000


def _good_trace() -> dict[str, object]:
    events = [
        {"ph": "M", "name": "process_name", "pid": 7, "tid": 0, "args": {"name": "python"}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 7, "tid": 7, "ts": START_US,
         "dur": 50.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "pid": 7, "tid": 7, "ts": START_US + 60,
         "dur": 10.0},
    ]  # fmt: skip
    return {"schemaVersion": 1, "baseTimeNanoseconds": BASE_NS, "traceEvents": events}


def _gz(data: object) -> bytes:
    return gzip.compress(json.dumps(data).encode())


def _truncated_gzip() -> bytes:
    whole = _gz(_good_trace() | {"traceEvents": _good_trace()["traceEvents"] * 200})  # type: ignore[operator]
    return whole[: len(whole) // 2]


def _no_base() -> bytes:
    trace = _good_trace()
    del trace["baseTimeNanoseconds"]
    return _gz(trace)


def _missing_ts_or_dur() -> bytes:
    trace = _good_trace()
    trace["traceEvents"] = [  # type: ignore[index]
        *trace["traceEvents"],  # type: ignore[misc]
        {"ph": "X", "cat": "cpu_op", "name": "no ts", "pid": 7, "tid": 7, "dur": 1.0},
        {"ph": "X", "cat": "cpu_op", "name": "no dur", "pid": 7, "tid": 7, "ts": START_US},
        {"ph": "X", "cat": "cpu_op", "name": "ts as text", "pid": 7, "tid": 7, "ts": "soon"},
    ]
    return _gz(trace)


CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated_gzip": (_truncated_gzip, "truncated or damaged gzip"),
    "not_json": (lambda: gzip.compress(b"this is not JSON at all"), "not a Chrome trace"),
    "plain_not_json": (lambda: b"<html>oops</html>", "not a Chrome trace"),
    "empty_file": (lambda: b"", "the file is empty"),
    "empty_gzip": (lambda: gzip.compress(b""), "the file is empty"),
}
"""Traces that cannot be merged: the problem each must be named with."""


def _session(tmp_path: Path, bad_name: str, bad: bytes) -> Path:
    session = tmp_path / "20260101T000000Z-bad-abc123"
    for stage in ("thinker", "talker"):
        (session / stage).mkdir(parents=True)
    (session / "thinker" / "rank0.1.pt.trace.json.gz").write_bytes(_gz(_good_trace()))
    (session / "talker" / bad_name).write_bytes(bad)
    report = {
        "session_id": session.name,
        "stages": [
            {"stage": "thinker", "replica": "a:1", "ok": True, "error": ""},
            {"stage": "talker", "replica": "b:1", "ok": True, "error": ""},
        ],
        "clocks": {s: {"offset_ns": 0, "error_ns": 0} for s in ("thinker", "talker")},
    }
    (session / "report.json").write_text(json.dumps(report))
    return session


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_trace_is_named_and_the_others_merged(tmp_path: Path, case: str) -> None:
    make, problem = CASES[case]
    name = "rank0.2.pt.trace.json.gz"
    session = _session(tmp_path, name, make())
    before = sorted(p.relative_to(session) for p in session.rglob("*") if p.is_file())
    files = rebuild_report(session)
    named = [w for w in files.warnings if f"talker/{name}" in w]
    assert named and any(problem in w for w in named), files.warnings
    events = read_json(files.timeline)["traceEvents"]
    assert "aten::mm" in {e.get("name") for e in events}  # the thinker's trace is merged
    summary = files.summary.read_text()
    assert "## Trace problems" in summary and f"talker/{name}" in summary
    after = {p.relative_to(session) for p in session.rglob("*") if p.is_file()}
    assert set(before) <= after  # every pulled file stays on disk
    assert not [p for p in after if p.name.endswith((".part", ".tmp", ".comma"))]


def test_a_trace_without_base_time_is_merged_with_a_warning(tmp_path: Path) -> None:
    session = _session(tmp_path, "rank0.2.pt.trace.json.gz", _no_base())
    files = rebuild_report(session)
    assert any("has no baseTimeNanoseconds" in w for w in files.warnings), files.warnings
    labels = {
        e["args"]["name"]
        for e in read_json(files.timeline)["traceEvents"]
        if e["ph"] == "M" and e["name"] == "process_name"
    }
    assert {"thinker", "talker"} <= labels


def test_events_missing_ts_or_dur_are_counted_and_left_out(tmp_path: Path) -> None:
    session = _session(tmp_path, "rank0.2.pt.trace.json.gz", _missing_ts_or_dur())
    files = rebuild_report(session)
    text = "\n".join(files.warnings)
    assert "1 events without a ts" in text
    assert "1 complete events without a valid dur" in text
    assert "1 events that are not trace events were skipped" in text
    names = {e.get("name") for e in read_json(files.timeline)["traceEvents"]}
    assert {"aten::mm", "aten::add"} <= names and not names & {"no ts", "no dur", "ts as text"}


def test_a_trace_with_no_events_is_merged_as_empty(tmp_path: Path) -> None:
    empty = _gz({"baseTimeNanoseconds": BASE_NS, "traceEvents": []})
    session = _session(tmp_path, "rank0.2.pt.trace.json.gz", empty)
    files = rebuild_report(session)
    assert not [w for w in files.warnings if "skipped" in w], files.warnings
    assert read_json(files.timeline)["metadata"]["traces"][1]["file"].startswith("talker/")


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_reader_names_the_file_and_the_problem(tmp_path: Path, case: str) -> None:
    make, problem = CASES[case]
    path = tmp_path / "x.pt.trace.json.gz"
    path.write_bytes(make())
    with pytest.raises(TraceError, match=problem) as info, TraceReader(path) as reader:
        list(reader.chunks())
    assert str(path) in str(info.value)


def test_profile_report_prints_the_problem_and_exits_zero(tmp_path: Path) -> None:
    session = _session(tmp_path, "rank0.2.pt.trace.json.gz", _truncated_gzip())
    result = subprocess.run(
        [sys.executable, "-m", "omnistage.cli", "profile", "report", str(session)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "talker/rank0.2.pt.trace.json.gz" in result.stdout
    assert "truncated or damaged gzip" in result.stdout
