"""The report of a CUDA run: a GPU track, kernels linked by flows, device tables in summary.md.

No GPU is needed: the trace is synthetic, in the shape Kineto writes on a CUDA machine."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from omnistage.traces import SlimOptions, load_trace, op_stats, slim_copy_path
from omnistage.traces.report import rebuild_report
from tests.unit.trace_checks import flow_problems, misplaced_ops, nesting_problems, tef_problems
from tests.unit.trace_factory import CUDA_IDLE, REQUESTS, make_cuda_stage, read_json

START_NS = 1_790_000_000_000_000_000
DEVICE_CATS = {"kernel", "gpu_memcpy"}


@pytest.fixture()
def built(tmp_path: Path) -> tuple[Path, Path, Any]:
    session = tmp_path / "20260101T000000Z-cuda-abc123"
    trace, spans = make_cuda_stage(session / "dit", "dit", 0, start_ns=START_NS)
    report = {
        "session_id": session.name,
        "stages": [{"stage": "dit", "replica": "10.0.0.5:50061", "ok": True, "error": ""}],
        "clocks": {"dit": {"offset_ns": 0, "error_ns": 0, "rtt_ns": 0, "samples": 1}},
        "spans": [asdict(s) for s in spans],
    }
    (session / "report.json").write_text(json.dumps(report))
    files = rebuild_report(session, slim=SlimOptions(drop_patterns=(CUDA_IDLE,)))
    return session, trace, files


def _device(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS]


def test_the_gpu_has_its_own_track_with_every_kernel(built: tuple[Path, Path, Any]) -> None:
    _, trace, files = built
    original = load_trace(trace)["traceEvents"]
    events = read_json(files.timeline)["traceEvents"]
    assert tef_problems(events) == []
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e["ph"] == "M" and e["name"] == "process_name"
    }
    device = _device(events)
    assert len(device) == len(_device(original)) == 2 * len(REQUESTS)
    (gpu_pid,) = {e["pid"] for e in device}
    assert names[gpu_pid] == "dit · GPU 0"
    host_pid = next(p for p, n in names.items() if n == "dit")
    assert {e["pid"] for e in events if e.get("cat") == "cpu_op"} == {host_pid}
    # every launch's arrow goes from its runtime call to its kernel, both ends bound
    flows = [e for e in events if e.get("cat") == "ac2g"]
    assert len(flows) == 2 * len(device)
    assert {e["pid"] for e in flows if e["ph"] == "s"} == {host_pid}
    assert {e["pid"] for e in flows if e["ph"] == "f"} == {gpu_pid}
    assert flow_problems(events) == []
    assert nesting_problems(e for e in events if e["pid"] == 1) == []
    assert misplaced_ops(events, 0.002) == []
    # slimmed: the idle frames went, the kernels and their links to ops stayed
    assert files.slim_total.events_dropped == 50 * len(REQUESTS)
    assert not [e for e in events if e.get("name") == CUDA_IDLE]
    slim = load_trace(slim_copy_path(trace))
    assert len(_device(slim["traceEvents"])) == len(device)
    assert all("External id" in e["args"] for e in _device(slim["traceEvents"]))
    assert op_stats(slim) == op_stats(load_trace(trace))


def test_summary_has_device_tables_and_shares(built: tuple[Path, Path, Any]) -> None:
    files = built[2]
    text = files.summary.read_text()
    assert "### dit: top 15 ops by self device time" in text
    device_part = text.split("self device time", 1)[1]
    # each op gets its own device work: 120 µs per request
    for op in ("aten::mm", "aten::copy_"):
        row = next(line for line in device_part.splitlines() if line.startswith(f"| `{op}`"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == str(len(REQUESTS))
        assert cells[-2:] == [f"{0.120 * len(REQUESTS):.3f} ms", "50.0%"]
    stages = text.split("## Stages", 1)[1].split("###", 1)[0]
    row = next(line for line in stages.splitlines() if line.startswith("| dit |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"{2 * 0.120 * len(REQUESTS):.3f} ms"  # device busy
    device_share = float(cells[4].rstrip("%"))
    assert 0 < device_share < float(cells[2].rstrip("%")) <= 100
    assert re.search(r"\*\*[\d,]+ bytes saved\*\*", text)
