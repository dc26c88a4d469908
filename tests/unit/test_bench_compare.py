"""The benchmark suite's pure parts: statistics, CPU accounting, flags, and the renderer.
No engine starts here."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import chain_systems  # noqa: E402
import compare_stats  # noqa: E402
import proc_cpu  # noqa: E402
import profile_costs  # noqa: E402
import render_docs  # noqa: E402
from compare_stats import RequestRecord  # noqa: E402


def test_quantiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    q = compare_stats.quantiles(values, "x")
    assert q == pytest.approx({"x_p50": 50.5, "x_p90": 90.1, "x_p99": 99.01})
    assert compare_stats.quantiles([2.0], "y", 1000.0) == {
        "y_p50": 2000.0,
        "y_p90": 2000.0,
        "y_p99": 2000.0,
    }
    assert math.isnan(compare_stats.quantiles([math.nan], "z")["z_p50"])


def test_summarize_level_throughput_latency_and_cpu() -> None:
    records = [
        RequestRecord(sent=0.0, first_final=0.5, done=1.0, tokens=(8, 8)),
        RequestRecord(sent=0.0, first_final=1.0, done=2.0, tokens=(8, 8)),
        RequestRecord(sent=1.0, first_final=2.5, done=4.0, tokens=(8, 8)),
    ]
    cpu = {"client": 0.03, "orchestrator": 0.06, "engine": 5.0}
    s = compare_stats.summarize_level(2, records, 4.0, cpu)
    assert s["requests"] == 3
    assert s["requests_per_s"] == pytest.approx(0.75)
    assert s["output_tok_s"] == pytest.approx(48 / 4.0)
    assert s["final_stage_tokens"] == 24
    assert s["latency_s_p50"] == pytest.approx(2.0)
    assert s["first_final_ms_p50"] == pytest.approx(1000.0)
    assert s["cpu_s_outside_engines"] == pytest.approx(0.09)
    assert s["cpu_s_engines"] == pytest.approx(5.0)
    assert s["cpu_ms_outside_engines_per_request"] == pytest.approx(30.0)
    assert s["cpu_ms_outside_engines_per_token"] == pytest.approx(90.0 / 48)


def test_ratios_to_baseline() -> None:
    levels = {
        "inprocess": {"1": {"output_tok_s": 10.0, "latency_s_p50": 2.0}},
        "omnistage": {"1": {"output_tok_s": 9.0, "latency_s_p50": 2.5}},
    }
    ratios = compare_stats.ratios_to_baseline(levels, "inprocess")
    assert ratios["omnistage"]["1"]["output_tok_s"] == pytest.approx(0.9)
    assert ratios["omnistage"]["1"]["latency_s_p50"] == pytest.approx(1.25)
    assert ratios["omnistage"]["1"]["requests_per_s"] is None  # not measured


def test_closed_loop_keeps_concurrency_and_sends_each_request_once() -> None:
    in_flight = 0
    peak = 0
    seen: list[int] = []

    async def one(index: int) -> RequestRecord:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        seen.append(index)
        await asyncio.sleep(0.001 * (index % 3))  # uneven request times: behaviour, not a wait
        in_flight -= 1
        return RequestRecord(0.0, 0.0, 0.0, (1, 1))

    records, window = asyncio.run(compare_stats.closed_loop(one, 3, 10, first=5))
    assert len(records) == 10
    assert sorted(seen) == list(range(5, 15))
    assert peak == 3
    assert window > 0


def test_parse_stat_reads_past_a_command_with_spaces_and_parentheses() -> None:
    fields = ["S", "41"] + ["0"] * 9 + ["250", "70"] + ["0"] * 30
    text = "1234 (VLLM::Engine (x) y) " + " ".join(fields)
    assert proc_cpu.parse_stat(text) == (1234, 41, 320)


def fake_proc(root: Path, pid: int, ppid: int, ticks: int, title: str) -> None:
    folder = root / str(pid)
    folder.mkdir()
    fields = ["S", str(ppid)] + ["0"] * 9 + [str(ticks), "0"] + ["0"] * 30
    (folder / "stat").write_text(f"{pid} (comm) " + " ".join(fields))
    (folder / "cmdline").write_bytes(title.replace(" ", "\0").encode() + b"\0")


def test_cpu_roles_nearest_root_and_engines(tmp_path: Path) -> None:
    fake_proc(tmp_path, 1, 0, 5, "init")
    fake_proc(tmp_path, 10, 1, 100, "python bench/compare.py")  # the client root
    fake_proc(tmp_path, 20, 10, 300, "python -m omnistage.cli stage serve")  # a front end root
    fake_proc(tmp_path, 21, 20, 900, "VLLM::EngineCore")
    fake_proc(tmp_path, 22, 21, 4000, "VLLM::Worker")
    fake_proc(tmp_path, 23, 20, 7, "python -c from multiprocessing.resource_tracker")
    fake_proc(tmp_path, 30, 1, 50, "somebody else")
    fake_proc(tmp_path, 31, 30, 600, "VLLM::EngineCore")  # another system's engine: not counted
    (tmp_path / "self").mkdir()
    roots = {10: "client", 20: "frontend:thinker"}
    before = proc_cpu.sample(roots, tmp_path)
    assert before == {
        10: ("client", 100),
        20: ("frontend:thinker", 300),
        21: ("engine", 900),
        22: ("engine", 4000),
        23: ("frontend:thinker", 7),
    }
    after = {**before, 10: ("client", 110), 21: ("engine", 1000), 24: ("engine", 50)}
    by_role = proc_cpu.cpu_seconds_by_role(before, after, ticks_per_second=100)
    assert by_role == pytest.approx({"client": 0.1, "frontend:thinker": 0.0, "engine": 1.5})
    assert proc_cpu.outside_engines(by_role) == pytest.approx(0.1)


def test_the_three_systems_get_the_same_engine_settings() -> None:
    s = chain_systems.ChainSettings()
    kwargs = chain_systems.engine_kwargs(s, Path("/m"))
    stage = chain_systems.omnistage_stage_flags(s)
    serve = chain_systems.vllm_serve_flags(s, Path("/m"), "thinker", 8000)

    def flag(flags: list[str], name: str) -> str:
        return flags[flags.index(name) + 1]

    for key, name in (("dtype", "--dtype"), ("max_model_len", "--max-model-len")):
        assert flag(stage, name) == flag(serve, name) == str(kwargs[key])
    assert flag(stage, "--max-num-seqs") == flag(serve, "--max-num-seqs") == "64"
    assert "--compile" not in stage and "--enforce-eager" in serve and kwargs["enforce_eager"]
    assert json.loads(flag(stage, "--engine-options"))["seed"] == int(flag(serve, "--seed"))
    assert flag(stage, "--kv-cache-gib") == chain_systems.kv_cache_env(s)["VLLM_CPU_KVCACHE_SPACE"]


def test_sse_pieces_of_both_endpoints() -> None:
    chat = {"choices": [{"delta": {"content": "Hi"}}]}
    role = {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
    completion = {"choices": [{"text": " there"}]}
    usage = {"choices": [], "usage": {"completion_tokens": 8, "prompt_tokens": 3}}
    assert chain_systems.sse_piece(chat) == ("Hi", None)
    assert chain_systems.sse_piece(role) == ("", None)
    assert chain_systems.sse_piece(completion) == (" there", None)
    assert chain_systems.sse_piece(usage) == ("", 8)


def test_count_steps_of_vllm_and_torch_traces() -> None:
    trace = (
        b'{"traceEvents": [{"name": "execute_context_0(0)_generation_2(2)"},'
        b'{"name": "execute_context_1(8)_generation_0(0)"}, {"name": "aten::mm"},'
        b'{"name": "omnistage.step batch=2"}]}'
    )
    assert profile_costs.count_steps(trace) == 3


def synthetic_report() -> dict[str, Any]:
    def level(c: int, tok_s: float, p50: float) -> dict[str, Any]:
        return {
            "concurrency": c,
            "requests": 4,
            "requests_per_s": tok_s / 64,
            "output_tok_s": tok_s,
            "latency_s_p50": p50,
            "latency_s_p90": p50 * 1.2,
            "latency_s_p99": p50 * 1.3,
            "first_final_ms_p50": p50 * 600,
            "first_final_ms_p90": p50 * 700,
            "first_final_ms_p99": p50 * 800,
            "cpu_s_by_role": {"client": 0.1, "engine": 3.0},
            "cpu_s_outside_engines": 0.1,
            "cpu_ms_outside_engines_per_request": 25.0,
        }

    systems = {
        name: {"ready_s": 40.0, "levels": {"1": level(1, f, 2.0 / f), "4": level(4, 3 * f, 3 / f)}}
        for name, f in (("inprocess", 10.0), ("omnistage", 9.5), ("openai", 9.0))
    }
    levels = {n: s["levels"] for n, s in systems.items()}
    return {
        "started_at": "2026-01-01T00:00:00+00:00",
        "command": ["python", "bench/compare.py"],
        "duration_s": 600.0,
        "machine": {"nproc": 2, "cpu_model": "test CPU", "loadavg": [0.5], "versions": {}},
        "loadavg_after": [0.7],
        "settings": {"max_tokens": 32, "requests_per_level": {"1": 4, "4": 4}, "prompts": ["a"]},
        "compare": {
            "systems": {**systems, "broken": {"error": "RuntimeError: no"}},
            "ratios_to_inprocess": compare_stats.ratios_to_baseline(levels, "inprocess"),
        },
        "profile": {
            "idle": {"ratio": 0.995, "pair_ratio_min": 0.98, "pair_ratio_max": 1.01},
            "orchestrated_stops": [
                {
                    "stages": ["thinker"],
                    "wall_s": 4.4,
                    "ratio_to_slowest_own": 1.1,
                    "ratio_to_slowest_in_session": 1.05,
                }
            ],
            "own_stops": {
                "thinker": {
                    "stop_wall_s": 4.0,
                    "trace_bytes": 600_000,
                    "engine_steps": 10,
                    "trace_bytes_per_step": 60_000.0,
                    "fetch": {"mb_s": 70.0},
                }
            },
        },
        "tensor": {
            "sizes": [
                {
                    "bytes": 8 << 20,
                    "roundtrip_s_median": 0.08,
                    "grpc_gb_s": 0.21,
                    "memcpy_gb_s": 20.0,
                    "grpc_over_memcpy": 0.0105,
                }
            ]
        },
    }


def test_renderer_writes_tables_plots_and_keeps_the_notes(tmp_path: Path) -> None:
    source = tmp_path / "bench.json"
    source.write_text(json.dumps(synthetic_report()))
    notes = tmp_path / "notes.md"
    notes.write_text("Where omnistage is behind: hand-written words.\n")
    docs = tmp_path / "docs" / "benchmarks.md"
    render_docs.render(source, docs, tmp_path / "docs" / "img", notes)

    page = docs.read_text()
    assert "| concurrency | system | req/s |" in page
    assert "| 4 | omnistage (gRPC) |" in page
    assert "| 0.950 |" in page  # omnistage tok/s over the in-process bound at c=1
    assert "Where omnistage is behind: hand-written words." in page
    assert "broken: RuntimeError: no" in page
    assert "0.980–1.010" in page
    assert "![bench-throughput](img/bench-throughput.png)" in page
    for name in ("bench-throughput", "bench-latency", "bench-first-output"):
        image = tmp_path / "docs" / "img" / f"{name}.png"
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_report_prints_every_section() -> None:
    text = render_docs.text_report(synthetic_report())
    for title in ("Two-stage chain", "CPU seconds", "Profiling costs", "Tensor transfer"):
        assert title in text
    assert "broken: FAILED: RuntimeError: no" in text
