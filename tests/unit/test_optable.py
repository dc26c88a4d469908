"""Op tables built from torch.profiler Chrome traces (omnistage.traces.optable)."""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from omnistage.traces import OpStat, build_op_table, format_op_table, load_trace, op_stats

ITERATIONS = 5


@dataclass(frozen=True)
class Profiled:
    json_path: Path
    gz_path: Path
    # torch's own key_averages(): name -> (count, self_cpu_time_total, cpu_time_total)
    torch_stats: dict[str, tuple[int, float, float]]


def _profile(directory: Path, *, with_stack: bool) -> Profiled:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    x = torch.randn(16, 64)
    # Warm up outside the profiler: the first record_function lazily imports a module, and
    # with with_stack=True torch keeps raw pointers to the names of Python frames whose code
    # is freed after that import, so key_averages() fails now and then decoding garbage
    # (pytorch/pytorch#64345, #113564).
    with torch.no_grad(), record_function("warmup"):
        y = model(x)
        torch.matmul(y, y.T)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], with_stack=with_stack) as prof:
        for _ in range(ITERATIONS):
            with record_function("step"):
                y = model(x)
                torch.matmul(y, y.T)
    json_path = directory / "host.pt.trace.json"
    prof.export_chrome_trace(str(json_path))
    gz_path = directory / "host.pt.trace.json.gz"
    with json_path.open("rb") as src, gzip.open(gz_path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    torch_stats = {
        e.key: (e.count, e.self_cpu_time_total, e.cpu_time_total) for e in prof.key_averages()
    }
    return Profiled(json_path, gz_path, torch_stats)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Profiled:
    return _profile(tmp_path_factory.mktemp("with_stack"), with_stack=True)


@pytest.fixture(scope="module")
def profiled_no_stack(tmp_path_factory: pytest.TempPathFactory) -> Profiled:
    return _profile(tmp_path_factory.mktemp("no_stack"), with_stack=False)


def _by_name(stats: list[OpStat]) -> dict[str, OpStat]:
    return {s.name: s for s in stats}


def _events_of(trace: dict[str, Any], cat: str) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e.get("cat") == cat and e.get("ph") == "X"]


# ---------------------------------------------------------------- load_trace


def test_load_trace_reads_json_and_gzip_alike(profiled: Profiled) -> None:
    plain = load_trace(profiled.json_path)
    gzipped = load_trace(profiled.gz_path)
    assert plain == gzipped
    assert _events_of(plain, "cpu_op")


def test_load_trace_detects_gzip_by_content(profiled: Profiled, tmp_path: Path) -> None:
    misnamed = tmp_path / "trace.json"
    shutil.copyfile(profiled.gz_path, misnamed)
    assert load_trace(misnamed) == load_trace(profiled.json_path)


def test_load_trace_accepts_json_array_format(tmp_path: Path) -> None:
    path = tmp_path / "array.json"
    events = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}]
    path.write_text(json.dumps(events))
    assert load_trace(path) == {"traceEvents": events}


@pytest.mark.parametrize(
    ("file_name", "content"),
    [
        ("notes.txt", b"this is not json at all"),
        ("config.json", b'{"model": "x", "layers": 3}'),
        ("number.json", b"42"),
        ("broken.pt.trace.json.gz", b"\x1f\x8b\x08\x00garbage"),
        ("truncated.pt.trace.json", b'{"traceEvents": [{"ph": "X"'),
        ("binary.json", b"\xff\xfe\x00\x01\x80"),
    ],
)
def test_load_trace_rejects_non_traces_naming_the_file(
    tmp_path: Path, file_name: str, content: bytes
) -> None:
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=file_name.replace(".", r"\.")):
        load_trace(path)


def test_load_trace_rejects_truncated_gzip(profiled: Profiled, tmp_path: Path) -> None:
    path = tmp_path / "cut.pt.trace.json.gz"
    path.write_bytes(profiled.gz_path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut\.pt\.trace\.json\.gz"):
        load_trace(path)


def test_load_trace_replaces_bytes_that_are_not_utf8(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "garbled.pt.trace.json"
    path.write_bytes(
        b'{"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1,'
        b' "ts": 0, "dur": 5}, {"ph": "X", "cat": "python_function", "name": "\x8f\xa0bad",'
        b' "pid": 1, "tid": 1, "ts": 1, "dur": 1}]}'
    )
    with caplog.at_level("WARNING", logger="omnistage.traces.optable"):
        trace = load_trace(path)
    assert trace["traceEvents"][1]["name"] == "\ufffd\ufffdbad"
    assert "garbled.pt.trace.json" in caplog.text
    assert [s.name for s in op_stats(trace)] == ["aten::mm"]


def test_load_trace_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "absent.pt.trace.json")


def test_op_stats_rejects_a_mapping_without_events() -> None:
    with pytest.raises(ValueError, match="traceEvents"):
        op_stats({"schemaVersion": 1})


# ---------------------------------------------------------------- real traces


def test_op_stats_counts_calls_of_a_real_trace(profiled: Profiled) -> None:
    stats = _by_name(op_stats(load_trace(profiled.json_path)))
    # two Linear layers, one ReLU and one matmul per iteration
    assert stats["aten::linear"].calls == 2 * ITERATIONS
    assert stats["aten::addmm"].calls == 2 * ITERATIONS
    assert stats["aten::relu"].calls == ITERATIONS
    assert stats["aten::matmul"].calls == ITERATIONS
    assert stats["step"].calls == ITERATIONS
    # no device in a CPU-only profile
    assert all(s.self_device_us == 0.0 for s in stats.values())


def test_op_stats_is_sorted_by_self_cpu(profiled: Profiled) -> None:
    stats = op_stats(load_trace(profiled.gz_path))
    selfs = [s.self_cpu_us for s in stats]
    assert selfs == sorted(selfs, reverse=True)


def test_op_stats_matches_torch_key_averages_for_cpu_ops(profiled: Profiled) -> None:
    trace = load_trace(profiled.json_path)
    ours = _by_name(op_stats(trace))
    cpu_op_names = {e["name"] for e in _events_of(trace, "cpu_op")}
    assert cpu_op_names
    top = sorted(cpu_op_names, key=lambda n: profiled.torch_stats[n][1], reverse=True)
    assert {"aten::addmm", "aten::linear", "aten::relu", "aten::matmul"} <= set(top)
    for name in top:
        count, self_us, total_us = profiled.torch_stats[name]
        assert ours[name].calls == count, name
        # both come from the same nanosecond timestamps: only float rounding may differ
        assert ours[name].self_cpu_us == pytest.approx(self_us, rel=1e-3, abs=0.01), name
        assert ours[name].total_cpu_us == pytest.approx(total_us, rel=1e-3, abs=0.01), name


def test_op_stats_matches_torch_key_averages_without_stack(profiled_no_stack: Profiled) -> None:
    """Without Python frames torch's tree and ours agree on every row, annotations included."""
    trace = load_trace(profiled_no_stack.json_path)
    assert not _events_of(trace, "python_function")
    ours = _by_name(op_stats(trace))
    assert set(ours) == set(profiled_no_stack.torch_stats)
    for name, (count, self_us, total_us) in profiled_no_stack.torch_stats.items():
        assert ours[name].calls == count, name
        assert ours[name].self_cpu_us == pytest.approx(self_us, rel=1e-3, abs=0.01), name
        assert ours[name].total_cpu_us == pytest.approx(total_us, rel=1e-3, abs=0.01), name
    sum_self = sum(s.self_cpu_us for s in ours.values())
    sum_torch = sum(v[1] for v in profiled_no_stack.torch_stats.values())
    assert sum_self == pytest.approx(sum_torch, rel=1e-6)


def test_op_stats_does_not_count_python_functions(profiled: Profiled) -> None:
    trace = load_trace(profiled.json_path)
    python_names = {e["name"] for e in _events_of(trace, "python_function")}
    assert python_names, "with_stack=True should have produced python_function events"
    host_names = {e["name"] for e in _events_of(trace, "cpu_op")} | {
        e["name"] for e in _events_of(trace, "user_annotation")
    }
    stats = _by_name(op_stats(trace))
    assert set(stats) == host_names
    assert not python_names & set(stats)
    # the annotation is the root of every op: self times add up to its inclusive time
    assert sum(s.self_cpu_us for s in stats.values()) == pytest.approx(
        stats["step"].total_cpu_us, rel=1e-6
    )


def test_build_op_table_from_a_real_trace(profiled: Profiled) -> None:
    table = build_op_table(profiled.gz_path, row_limit=5, title="stage x: host.pt.trace.json.gz")
    lines = table.splitlines()
    assert lines[0] == "stage x: host.pt.trace.json.gz"
    assert "Self CPU %" in lines[2] and "# of Calls" in lines[2]
    assert "Self Device" not in table
    assert "aten::addmm" in table
    assert lines[-1].startswith("Self CPU time total: ")


# ---------------------------------------------------------------- synthetic traces


def _x(cat: str, name: str, ts: float, dur: float, tid: int = 1, **args: Any) -> dict[str, Any]:
    return {
        "ph": "X",
        "cat": cat,
        "name": name,
        "pid": 7,
        "tid": tid,
        "ts": ts,
        "dur": dur,
        "args": args,
    }


def _kernel(name: str, ts: float, dur: float, **args: Any) -> dict[str, Any]:
    return {
        "ph": "X",
        "cat": "kernel",
        "name": name,
        "pid": 0,
        "tid": 7,
        "ts": ts,
        "dur": dur,
        "args": args,
    }


def test_self_time_subtracts_direct_children_only() -> None:
    base = 1_700_000_000_000.0  # large absolute timestamps like Kineto's
    events = [
        _x("cpu_op", "outer", base + 0.0, 100.0),
        _x("cpu_op", "mid", base + 10.0, 50.0),
        _x("cpu_op", "leaf", base + 20.0, 10.0),
        _x("cpu_op", "leaf", base + 35.0, 25.0),  # ends exactly with its parent
        _x("cpu_op", "sibling", base + 70.0, 20.0),
        _x("cpu_op", "other_thread", base + 5.0, 30.0, tid=2),
        _x("cpu_op", "no_dur", base + 1.0, 0.0) | {"dur": None},
        {"ph": "B", "cat": "cpu_op", "name": "begin_event", "ts": base, "pid": 7, "tid": 1},
        {"ph": "M", "name": "process_name", "pid": 7, "tid": 0, "args": {"name": "python"}},
    ]
    stats = _by_name(op_stats({"traceEvents": events}))
    assert set(stats) == {"outer", "mid", "leaf", "sibling", "other_thread"}
    assert stats["outer"].self_cpu_us == pytest.approx(30.0)
    assert stats["outer"].total_cpu_us == pytest.approx(100.0)
    assert stats["mid"].self_cpu_us == pytest.approx(15.0)
    assert stats["leaf"].calls == 2
    assert stats["leaf"].self_cpu_us == pytest.approx(35.0)
    assert stats["sibling"].self_cpu_us == pytest.approx(20.0)
    assert stats["other_thread"].self_cpu_us == pytest.approx(30.0)


def test_python_frames_and_runtime_calls_are_transparent() -> None:
    events = [
        _x("cpu_op", "aten::linear", 0.0, 100.0),
        _x("python_function", "torch/nn/functional.py(1): linear", 5.0, 90.0),
        _x("cpu_op", "aten::addmm", 10.0, 60.0),
        _x("cuda_runtime", "cudaLaunchKernel", 20.0, 30.0, correlation=1),
        _x("gpu_user_annotation", "step", 0.0, 100.0),
    ]
    stats = _by_name(op_stats({"traceEvents": events}))
    assert set(stats) == {"aten::linear", "aten::addmm"}
    assert stats["aten::linear"].self_cpu_us == pytest.approx(40.0)
    assert stats["aten::addmm"].self_cpu_us == pytest.approx(60.0)


def test_only_child_of_the_same_name_merges_like_torch() -> None:
    events = [
        _x("cpu_op", "aten::copy_", 0.0, 100.0),
        _x("cpu_op", "aten::copy_", 10.0, 80.0),
        _x("cpu_op", "aten::copy_", 200.0, 10.0),
        _x("cpu_op", "aten::to", 300.0, 50.0),
        _x("cpu_op", "aten::to", 310.0, 10.0),
        _x("cpu_op", "aten::to", 330.0, 10.0),
    ]
    stats = _by_name(op_stats({"traceEvents": events}))
    assert stats["aten::copy_"].calls == 2
    assert stats["aten::copy_"].self_cpu_us == pytest.approx(110.0)
    assert stats["aten::copy_"].total_cpu_us == pytest.approx(110.0)
    # two children of the same name: no merge
    assert stats["aten::to"].calls == 3
    assert stats["aten::to"].total_cpu_us == pytest.approx(70.0)


def test_device_time_is_attributed_to_the_launching_op() -> None:
    events = [
        _x("cpu_op", "aten::mm", 0.0, 50.0, **{"External id": 11}),
        _x("cuda_runtime", "cudaLaunchKernel", 10.0, 5.0, correlation=101, **{"External id": 11}),
        _x("cpu_op", "aten::mm", 100.0, 50.0, **{"External id": 12}),
        _x("cpu_op", "aten::add", 200.0, 20.0, **{"External id": 13}),
        _x("cuda_runtime", "cudaLaunchKernel", 205.0, 5.0, correlation=103),
        _x("cpu_op", "aten::copy_", 300.0, 10.0, **{"External id": 14}),
        _kernel("sm90_gemm", 60.0, 400.0, correlation=101, **{"External id": 11}),
        _kernel("sm90_gemm", 160.0, 600.0, **{"External id": 12}),
        # no External id: linked through the runtime call's correlation
        _kernel("elementwise_add", 210.0, 30.0, correlation=103),
        {
            "ph": "X",
            "cat": "gpu_memcpy",
            "name": "Memcpy HtoD",
            "pid": 0,
            "tid": 8,
            "ts": 310.0,
            "dur": 70.0,
            "args": {"External id": 14},
        },
        {
            "ph": "X",
            "cat": "gpu_memset",
            "name": "Memset (Device)",
            "pid": 0,
            "tid": 8,
            "ts": 320.0,
            "dur": 3.0,
            "args": {},
        },
        # launched by nothing in the trace: a row of its own
        _kernel("nccl_allreduce", 500.0, 100.0, **{"External id": 999}),
        _kernel("nccl_allreduce", 700.0, 100.0, **{"External id": 0}),
    ]
    stats = _by_name(op_stats({"traceEvents": events}))
    assert stats["aten::mm"].calls == 2
    assert stats["aten::mm"].self_device_us == pytest.approx(1000.0)
    assert stats["aten::add"].self_device_us == pytest.approx(30.0)
    assert stats["aten::copy_"].self_device_us == pytest.approx(70.0)
    assert "sm90_gemm" not in stats and "Memcpy HtoD" not in stats
    assert stats["nccl_allreduce"] == OpStat("nccl_allreduce", 2, 0.0, 0.0, 200.0)
    assert stats["Memset (Device)"].self_device_us == pytest.approx(3.0)
    # ties on self CPU time are broken by device time
    order = [s.name for s in op_stats({"traceEvents": events})]
    assert order.index("nccl_allreduce") < order.index("Memset (Device)")

    table = format_op_table(op_stats({"traceEvents": events}))
    header = table.splitlines()[1]
    assert "Self Device" in header and "Self Device %" in header
    row = next(line for line in table.splitlines() if line.startswith("aten::mm "))
    assert "1.000ms" in row  # its device time
    assert "76.75%" in row  # 1000 of 1303 us of device time
    assert "Self Device time total: 1.303ms" in table


def test_no_device_events_means_no_device_columns() -> None:
    events = [_x("cpu_op", "aten::mm", 0.0, 50.0, **{"External id": 1})]
    table = format_op_table(op_stats({"traceEvents": events}))
    assert "Device" not in table
    assert "Self CPU time total: 50.000us" in table


# ---------------------------------------------------------------- format_op_table


def _data_rows(table: str) -> list[str]:
    lines = table.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("---")]
    return lines[rules[1] + 1 : rules[2]]


def test_format_op_table_honours_row_limit() -> None:
    stats = [OpStat(f"op{i}", i + 1, 100.0 - i, 200.0, 0.0) for i in range(30)]
    assert len(_data_rows(format_op_table(stats, row_limit=7))) == 7
    assert [r.split()[0] for r in _data_rows(format_op_table(stats, row_limit=3))] == [
        "op0",
        "op1",
        "op2",
    ]
    assert len(_data_rows(format_op_table(stats))) == 30
    assert len(_data_rows(format_op_table(stats, row_limit=0))) == 30
    # percentages are of all rows, shown or not
    total = sum(s.self_cpu_us for s in stats)
    first = _data_rows(format_op_table(stats, row_limit=1))[0]
    assert f"{100.0 * 100.0 / total:.2f}%" in first


def test_format_op_table_units_and_long_names() -> None:
    long_name = "void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>>"
    stats = [
        OpStat("slow", 1, 2_500_000.0, 3_000_000.0, 0.0),
        OpStat("medium", 2, 1_234.5, 1_234.5, 0.0),
        OpStat(long_name, 3, 0.25, 0.25, 0.0),
    ]
    table = format_op_table(stats, title="my title")
    lines = table.splitlines()
    assert lines[0] == "my title"
    assert "2.500s" in table and "3.000s" in table
    assert "1.234ms" in table or "1.235ms" in table
    assert "0.250us" in table
    assert long_name not in table
    assert long_name[:20] in table and "..." in table
    assert len({len(line) for line in lines[1:-1]}) == 1  # fixed width


def test_format_op_table_of_nothing() -> None:
    table = format_op_table([])
    assert _data_rows(table) == []
    assert "Self CPU time total: 0.000us" in table
