"""summary.html (omnistage.traces.html): written with summary.md, self-contained, escaped."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest

from omnistage.traces import RequestSpan
from omnistage.traces.spans import ChunkSpan
from omnistage.traces.summary import write_summary
from tests.unit.trace_factory import Session, copy_session, make_cuda_stage, shared_session

NASTY = "<img src=x onerror=alert(1)>&\"'"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return shared_session(tmp_path_factory)


def test_the_page_holds_the_waterfall_the_stages_and_the_ops(
    session: Session, tmp_path: Path
) -> None:
    fresh = copy_session(session, tmp_path / session.dir.name)
    fresh.write_report(spans=[asdict(s) for s in fresh.spans])
    write_summary(fresh.dir, report={"stages": []}, spans=fresh.spans, clocks={})
    page = (fresh.dir / "summary.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert re.findall(r"<g class='request' data-request='([^']*)'", page) == ["r0", "r1", "r2"]
    # one lane per stage in each request's row, in pipeline order, with its hand-off
    rows = page.split("<g class='request'")[1:]
    for row in rows:
        assert re.findall(r"<g class='span' data-stage='(\w+)'", row) == ["thinker", "talker"]
        assert row.count("class='handoff'") == 1
    assert "<table class='stages'>" in page and "latency p90" in page
    assert re.findall(r"<table class='ops' data-stage='(\w+)'", page) == ["thinker", "talker"]
    assert "<code>aten::linear</code>" in page
    # nothing to fetch: no script, no link, no source, and a policy that forbids it all
    assert not re.search(r"<script|<link|\ssrc=|href=|url\(", page)
    assert "default-src 'none'" in page


def test_every_name_is_escaped(tmp_path: Path) -> None:
    t0 = 1_700_000_000_000_000_000
    spans = [
        RequestSpan(NASTY, NASTY, 0, NASTY, t0, t0 + 1_000, t0 + 5_000, 0.0, 0.0),
        RequestSpan(NASTY, "b&c", 1, "", t0 + 4_000, 0, t0 + 9_000, 0.001, 0.0),
    ]
    write_summary(tmp_path, report={"session_id": NASTY}, spans=spans, clocks={})
    page = (tmp_path / "summary.html").read_text(encoding="utf-8")
    assert NASTY not in page and "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;&#x27;" in page
    assert "b&amp;c" in page and "b&c" not in page
    assert page.count("<g class='request'") == 1
    assert "<table class='ops'" not in page


def test_a_session_without_spans_or_traces(tmp_path: Path) -> None:
    write_summary(tmp_path, report={}, spans=[], clocks={})
    page = (tmp_path / "summary.html").read_text(encoding="utf-8")
    assert "No request spans were recorded" in page and "<svg" not in page


def test_a_cuda_stage_gets_its_device_table(tmp_path: Path) -> None:
    _, spans = make_cuda_stage(tmp_path / "dit", "dit", 0, start_ns=1_700 * 10**15)
    write_summary(tmp_path, report={}, spans=list(spans), clocks={})
    page = (tmp_path / "summary.html").read_text(encoding="utf-8")
    assert "<h3>dit: top 15 ops by self device time</h3>" in page
    stage_row = re.search(r"<tr><td>dit</td>(.*?)</tr>", page)
    assert stage_row and "0.720 ms" in stage_row.group(1)  # 3 requests × 2 × 120 µs of device


def test_a_streamed_stages_chunk_calls_are_marks_in_its_bar(tmp_path: Path) -> None:
    """The waterfall draws each chunk call of a streamed stage (its ChunkSpans) as a box of
    its own inside the stage's bar, with its index and times; a stage called once has none."""
    t0 = 1_700_000_000_000_000_000
    ms = 1_000_000
    chunks = tuple(
        ChunkSpan(t0 + (20 + 10 * i) * ms, t0 + (21 + 10 * i) * ms, t0 + (22 + 10 * i) * ms,
                  t0 + (27 + 10 * i) * ms, stage_time_s=0.005)
        for i in range(3)
    )  # fmt: skip
    spans = [
        RequestSpan("r1", "talker", 0, "", t0, t0 + 20 * ms, t0 + 50 * ms, 0.0, 0.0),
        RequestSpan("r1", "code2wav", 1, "", t0 + 21 * ms, t0 + 22 * ms, t0 + 47 * ms, 0.0,
                    0.0, chunks=chunks),
    ]  # fmt: skip
    write_summary(tmp_path, report={}, spans=spans, clocks={})
    page = (tmp_path / "summary.html").read_text(encoding="utf-8")
    bars = dict(re.findall(r"<g class='span' data-stage='(\w+)'>(.*?)</g>", page))
    assert "class='chunk'" not in bars["talker"]
    marks = re.findall(r"<rect class='chunk' data-chunk='(\d)' x='([\d.]+)'.*?<title>(.*?)</title>",
                       bars["code2wav"])  # fmt: skip
    assert [m[0] for m in marks] == ["0", "1", "2"]
    xs = [float(m[1]) for m in marks]
    assert xs == sorted(xs) and len(set(xs)) == 3  # each at its own call's start
    assert marks[1][2] == (
        "chunk 1: cut at 30.000 ms, call 31.000 ms → 37.000 ms (6.000 ms), first output at "
        "32.000 ms; the stage&#x27;s own time 5.000 ms"
    )
