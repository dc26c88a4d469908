"""The CUDA-shaped session generator of bench/trace_scale.py, at a very small scale."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import trace_scale  # noqa: E402

SCALE = 0.001
HEADER = ("schemaVersion", "deviceProperties", "distributedInfo", "displayTimeUnit")


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("trace-scale")
    return trace_scale.generate_session(root, SCALE, requests=2, workers=1)


def _load(info: dict[str, Any], stage: str) -> dict[str, Any]:
    with gzip.open(info["dir"] / info["stages"][stage]["file"], "rt") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def _ns(value: float) -> int:
    return round(value * 1000)


def test_traces_are_gzip_json_with_kineto_header_first(session: dict[str, Any]) -> None:
    for stage, spec in session["stages"].items():
        path = session["dir"] / spec["file"]
        subprocess.run(["gzip", "-t", str(path)], check=True)
        with gzip.open(path, "rt") as fh:
            text = fh.read(2000)
        assert text.startswith('{\n  "schemaVersion": 1,')
        assert '\n  {\n    "name": "process_name", "ph": "M"' in text  # one key line per event
        data = _load(session, stage)
        keys = list(data)
        for key in (*HEADER, "baseTimeNanoseconds"):
            assert keys.index(key) < keys.index("traceEvents"), key
        assert data["distributedInfo"]["rank"] == 0
        assert data["baseTimeNanoseconds"] % 1_000_000_000 == 0
        stamps = [e["ts"] for e in data["traceEvents"] if e["ph"] != "M"]
        assert min(stamps) > 1e11 and max(stamps) < 1e14  # µs since the host's boot
        assert len(data["traceEvents"]) == spec["events"] + 6  # and six metadata events


def test_flows_link_runtime_calls_to_kernels_on_the_gpu(session: dict[str, Any]) -> None:
    data = _load(session, "talker")
    events = data["traceEvents"]
    labels = {e["pid"]: e["args"]["labels"] for e in events if e["name"] == "process_labels"}
    gpu = {pid for pid, label in labels.items() if label == "GPU 0"}
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy")]
    assert device and {e["pid"] for e in device} == gpu and {e["tid"] for e in device} == {7}
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert starts and set(starts) == set(ends)
    assert all(e["bp"] == "e" and e["cat"] == "ac2g" for e in ends.values())
    runtime = {e["args"]["correlation"]: e for e in events if e.get("cat") == "cuda_runtime"}
    for kernel in device:
        corr = kernel["args"]["correlation"]
        assert starts[corr]["ts"] == runtime[corr]["ts"] and ends[corr]["ts"] == kernel["ts"]
        assert kernel["args"]["External id"] == runtime[corr]["args"]["External id"]
    counts = session["stages"]["talker"]["mix"]
    total = sum(counts.values())
    assert 0.3 < counts["cpu_op"] / total < 0.5 and 0.15 < counts["flow"] / total < 0.3
    assert 0.05 < counts["python_function"] / total < 0.2


def test_slices_nest_on_every_thread(session: dict[str, Any]) -> None:
    for stage in session["stages"]:
        threads: dict[tuple[int, int], list[tuple[int, int, str]]] = defaultdict(list)
        for e in _load(session, stage)["traceEvents"]:
            if e["ph"] == "X":
                start = _ns(e["ts"])
                threads[(e["pid"], e["tid"])].append((start, start + _ns(e["dur"]), e["name"]))
        assert len(threads) == 2
        for slices in threads.values():
            slices.sort(key=lambda s: (s[0], -s[1]))
            stack: list[tuple[int, int, str]] = []
            for start, end, name in slices:
                assert end >= start
                while stack and start >= stack[-1][1]:
                    stack.pop()
                assert not stack or end <= stack[-1][1], f"{stage}: {name} overlaps {stack[-1]}"
                stack.append((start, end, name))


def test_report_json_has_a_span_per_request_and_stage(session: dict[str, Any]) -> None:
    report = json.loads((session["dir"] / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["thinker", "talker", "code2wav"]
    assert set(report["clocks"]) == {"thinker", "talker", "code2wav"}
    assert len(report["spans"]) == 3 * 2
    for span in report["spans"]:
        assert span["start_unix_ns"] < span["first_output_unix_ns"] < span["end_unix_ns"]
    by_key = {(s["request_id"], s["stage_index"]): s for s in report["spans"]}
    for (request, index), span in by_key.items():
        if index:  # pipeline order: the next stage starts after the previous one's end
            assert span["start_unix_ns"] > by_key[(request, index - 1)]["end_unix_ns"]
            assert 0.001 < span["handoff_s"] < 0.01


def test_sizes_scale_with_scale(session: dict[str, Any], tmp_path: Path) -> None:
    double = trace_scale.generate_session(tmp_path, 2 * SCALE, requests=2, workers=1)
    assert 1.6 < double["gzip_bytes"] / session["gzip_bytes"] < 2.4
    assert 1.6 < double["json_bytes"] / session["json_bytes"] < 2.4
    talker, thinker = (session["stages"][s]["gzip_bytes"] for s in ("talker", "thinker"))
    assert 1.5 < talker / thinker < 2.5


@pytest.mark.parametrize("length", [0, 1, 7, 1000, 70_000], ids=lambda n: f"{n}-bytes")
def test_crc32_combine_matches_zlib(length: int) -> None:
    rng = random.Random(length)
    a, b = rng.randbytes(rng.randrange(0, 5000)), rng.randbytes(length)
    combined = trace_scale.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b))
    assert combined == zlib.crc32(a + b)
