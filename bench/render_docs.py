"""Render docs/benchmarks.md and its plots from the JSON of one `bench/compare.py` run.

    .venv/bin/python bench/render_docs.py [bench/results/bench.json] [--docs docs/benchmarks.md]

Every figure in the page comes from that one JSON file; nothing is typed in by hand, except the
analysis in docs/benchmarks-notes.md, which is included as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_machine import align_table
from compare_stats import ratio

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "bench.json"
DEFAULT_DOCS = ROOT / "docs" / "benchmarks.md"
DEFAULT_NOTES = ROOT / "docs" / "benchmarks-notes.md"
LABELS = {
    "inprocess": "in process (lower bound)",
    "omnistage": "omnistage (gRPC)",
    "omnistage-http": "omnistage (OpenAI HTTP)",
    "openai": "chained vllm serve",
}
IDLE_GOAL = 0.99
HTTP_THROUGHPUT_GOAL = 0.97
STOP_GOAL = 1.1


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _systems(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    systems: dict[str, dict[str, Any]] = report.get("compare", {}).get("systems", {})
    return systems


def _levels(report: dict[str, Any]) -> list[str]:
    found = {c for s in _systems(report).values() for c in s.get("levels", {})}
    return sorted(found, key=int)


# -- rows ---------------------------------------------------------------------------------------


def compare_rows(report: dict[str, Any]) -> list[list[str]]:
    ratios = report.get("compare", {}).get("ratios_to_inprocess", {})
    rows = [
        [
            "concurrency",
            "system",
            "req/s",
            "output tok/s",
            "tok/s vs in-proc",
            "latency p50 s",
            "p90 s",
            "p99 s",
            "final stage first output p50 ms",
            "p90 ms",
            "p99 ms",
            "CPU outside engines ms/req",
            "load avg (start→end)",
        ]
    ]
    for level in _levels(report):
        for name, system in _systems(report).items():
            s = system.get("levels", {}).get(level)
            if s is None:
                continue
            r = ratios.get(name, {}).get(level, {})
            rows.append(
                [
                    level,
                    LABELS.get(name, name),
                    fmt(s["requests_per_s"], ".2f"),
                    fmt(s["output_tok_s"], ".1f"),
                    fmt(r.get("output_tok_s"), ".3f"),
                    fmt(s["latency_s_p50"], ".2f"),
                    fmt(s["latency_s_p90"], ".2f"),
                    fmt(s["latency_s_p99"], ".2f"),
                    fmt(s["first_final_ms_p50"], ".0f"),
                    fmt(s["first_final_ms_p90"], ".0f"),
                    fmt(s["first_final_ms_p99"], ".0f"),
                    fmt(s["cpu_ms_outside_engines_per_request"], ".0f"),
                    "→".join(fmt(x, ".1f") for x in s.get("loadavg_1min", [])) or "-",
                ]
            )
    return rows


def cpu_rows(report: dict[str, Any]) -> list[list[str]]:
    roles = sorted({r for s in _all_levels(report) for r in s["cpu_s_by_role"]})
    rows = [["concurrency", "system", *[f"{r} CPU s" for r in roles], "outside engines s"]]
    for level in _levels(report):
        for name, system in _systems(report).items():
            s = system.get("levels", {}).get(level)
            if s is None:
                continue
            by_role = s["cpu_s_by_role"]
            cells = [fmt(by_role.get(r), ".2f") for r in roles]
            rows.append([level, name, *cells, fmt(s["cpu_s_outside_engines"], ".2f")])
    return rows


def _per_request_ms(summary: dict[str, Any] | None, role: str) -> float | None:
    if not summary or not summary.get("requests"):
        return None
    cpu = summary["cpu_s_by_role"].get(role)
    return None if cpu is None else cpu / summary["requests"] * 1000


def front_door_rows(report: dict[str, Any]) -> list[list[str]]:
    """The HTTP API against the gRPC client on the same servers, and the orchestrator's CPU per
    request as an HTTP front door against one of vLLM's own OpenAI servers in the chain."""
    systems = _systems(report)
    http, grpc_, chain = (systems.get(n, {}).get("levels", {}) for n in SYSTEM_KEYS)
    stage_names = report.get("settings", {}).get("stage_names") or ["?"]
    first_front_end = f"frontend:{stage_names[0]}"
    rows = [
        [
            "concurrency",
            "HTTP tok/s",
            "gRPC tok/s",
            f"HTTP / gRPC (goal ≥ {HTTP_THROUGHPUT_GOAL})",
            "orchestrator CPU ms/req, HTTP",
            "orchestrator CPU ms/req, gRPC",
            "vllm serve front end CPU ms/req (first stage)",
            "HTTP orchestrator / vllm serve (goal ≤ 1)",
        ]
    ]
    for level in _levels(report):
        h, g, c = http.get(level), grpc_.get(level), chain.get(level)
        if h is None:
            continue
        door = _per_request_ms(h, "orchestrator")
        vllm_door = _per_request_ms(c, first_front_end)
        rows.append(
            [
                level,
                fmt(h["output_tok_s"], ".1f"),
                fmt(g["output_tok_s"] if g else None, ".1f"),
                fmt(ratio(h["output_tok_s"], g["output_tok_s"]) if g else None, ".3f"),
                fmt(door, ".1f"),
                fmt(_per_request_ms(g, "orchestrator"), ".1f"),
                fmt(vllm_door, ".1f"),
                fmt(ratio(door, vllm_door), ".3f"),
            ]
        )
    return rows


SYSTEM_KEYS = ("omnistage-http", "omnistage", "openai")


def _all_levels(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for system in _systems(report).values() for s in system.get("levels", {}).values()]


def profile_rows(report: dict[str, Any]) -> list[list[str]]:
    profile = report.get("profile", {})
    rows = [["measure", "value", "goal"]]
    idle = profile.get("idle", {})
    if idle:
        spread = (
            f"{fmt(idle.get('pair_ratio_min'), '.3f')}–{fmt(idle.get('pair_ratio_max'), '.3f')}"
        )
        rows.append(
            [
                "throughput, profiler configured but idle / not configured (pooled)",
                fmt(idle.get("ratio"), ".3f"),
                f"≥ {IDLE_GOAL}",
            ]
        )
        rows.append(["  the same, per pair of rounds (min–max)", spread, ""])
    for stop in profile.get("orchestrated_stops", []):
        label = f"StopProfile of {len(stop['stages'])} stage(s) ({', '.join(stop['stages'])})"
        rows.append([f"{label}: wall s", fmt(stop["wall_s"], ".2f"), ""])
        rows.append(
            [
                "  / the slowest of those stages' own stop",
                fmt(stop.get("ratio_to_slowest_own"), ".3f"),
                f"≤ {STOP_GOAL}",
            ]
        )
        rows.append(
            [
                "  / the slowest stage's stop and pull in the same session",
                fmt(stop.get("ratio_to_slowest_in_session"), ".3f"),
                "",
            ]
        )
    for stage, own in profile.get("own_stops", {}).items():
        fetch = own.get("fetch", {})
        rows.append(
            [f"{stage}: its own StopProfile, wall s", fmt(own.get("stop_wall_s"), ".2f"), ""]
        )
        rows.append([f"{stage}: trace bytes", fmt(own.get("trace_bytes"), ",.0f"), ""])
        rows.append([f"{stage}: engine steps in the trace", fmt(own.get("engine_steps"), "d"), ""])
        rows.append(
            [
                f"{stage}: trace bytes per engine step",
                fmt(own.get("trace_bytes_per_step"), ",.0f"),
                "",
            ]
        )
        rows.append([f"{stage}: FetchProfileFile MB/s", fmt(fetch.get("mb_s"), ".1f"), ""])
    return rows


def tensor_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = [["tensor MiB", "gRPC round trip ms", "gRPC GB/s", "memcpy GB/s", "gRPC / memcpy"]]
    for size in report.get("tensor", {}).get("sizes", []):
        rows.append(
            [
                fmt(size["bytes"] / (1 << 20), ".0f"),
                fmt(size["roundtrip_s_median"] * 1000, ".1f"),
                fmt(size["grpc_gb_s"], ".2f"),
                fmt(size["memcpy_gb_s"], ".2f"),
                fmt(size["grpc_over_memcpy"], ".3f"),
            ]
        )
    return rows


# -- text and markdown --------------------------------------------------------------------------


def text_report(report: dict[str, Any]) -> str:
    parts = [headline(report)]
    for title, rows in sections(report):
        if len(rows) > 1:
            parts += ["", title, align_table(rows)]
    for name, system in _systems(report).items():
        if "error" in system:
            parts.append(f"{name}: FAILED: {system['error']}")
    return "\n".join(parts)


def sections(report: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    return [
        ("Two-stage chain, per concurrency level", compare_rows(report)),
        ("CPU seconds by process role over each level", cpu_rows(report)),
        ("The OpenAI HTTP front door", front_door_rows(report)),
        ("Profiling costs", profile_rows(report)),
        ("Tensor transfer through a stage (gRPC) against memcpy", tensor_rows(report)),
    ]


def headline(report: dict[str, Any]) -> str:
    m = report.get("machine", {})
    v = m.get("versions", {})
    s = report.get("settings", {})
    return (
        f"machine: {m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('ram_total_gib')} GiB; "
        f"load {fmt((m.get('loadavg') or [math.nan])[0], '.2f')} before, "
        f"{fmt((report.get('loadavg_after') or [math.nan])[0], '.2f')} after\n"
        f"versions: vllm {v.get('vllm')}, torch {v.get('torch')}, grpc {v.get('grpc')}, "
        f"omnistage {v.get('omnistage')}, python {m.get('python')}\n"
        f"workload: {s.get('model')} {s.get('dtype')}, max_tokens {s.get('max_tokens')} per "
        f"stage, ignore_eos {s.get('ignore_eos')}, temperature {s.get('temperature')}; "
        f"run took {fmt(report.get('duration_s'), '.0f')} s"
    )


def _numeric(cell: str) -> bool:
    return cell == "-" or cell.replace(",", "").replace(".", "").replace("–", "").isdigit()


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """Columns of numbers right-aligned, the others left."""
    head, *body = rows
    align = ["---:" if all(_numeric(row[i]) for row in body) else "---" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


METHOD = """\
- **Workload**: the bundled two-stage chain of `{pipeline}`: the thinker answers a chat
  message, its edge processor (`{processor}`) turns the thinker's text into the rewriter's
  input. Fixed prompts ({prompts} of them, in turn), `max_tokens` {max_tokens} per stage,
  `ignore_eos`, temperature {temperature}: every request generates the same number of tokens
  in every system. One warm-up request per system is not measured.
- **Engines**: the same for all three, omnistage's `stage serve` defaults: {model}, dtype
  {dtype}, `max_model_len` {max_model_len}, `max_num_seqs` {max_num_seqs}, eager
  ({enforce_eager}), KV cache {kv_cache_gib} GiB (`VLLM_CPU_KVCACHE_SPACE`), engine seed
  {engine_seed}. Only one system's engines are alive at a time.
- **Systems**: *in process*: two vLLM `AsyncLLM` engines in the benchmark's own process,
  chained in asyncio (the lower bound); *omnistage*: two `omnistage stage serve` processes and
  an `omnistage orchestrator serve`, driven by `omnistage.AsyncClient`; *chained vllm serve*:
  two `vllm serve` OpenAI servers, chained by an aiohttp client that streams stage 1's chat
  completion and sends its text through the same edge processor to stage 2.
- **Load**: closed loop: at concurrency *c*, *c* callers each send their next request when
  their last one finished, {requests} requests per level. Throughput is requests (and output
  tokens of both stages) over the window from the first send to the last completion.
- **Latency**: end to end, as the caller sees it. *Final stage first output*: from the send
  to the first piece of the rewriter's output that carries tokens (text for the OpenAI
  chain). p99 of a few dozen requests is close to the maximum.
- **CPU outside the engines**: `utime + stime` from `/proc/<pid>/stat`, sampled before and
  after each level for every process of the system. vLLM's `VLLM::EngineCore` and
  `VLLM::Worker` processes are "engine"; every other process counts with its nearest root:
  the benchmark's process (the *driver* in process, the *client* otherwise), the
  orchestrator, and each stage's front end (`stage serve` or `vllm serve` process: gRPC or
  HTTP server, tokenizer, detokenizer). In process, the engines' front ends run inside the
  driver, so "outside engines" is the same work in all three: everything but the engine
  core and its worker.
"""


def method_text(report: dict[str, Any]) -> str:
    s = report.get("settings", {})
    per_level = ", ".join(f"{n} at c={c}" for c, n in s.get("requests_per_level", {}).items())
    values = {**s, "processor": "chat", "prompts": len(s.get("prompts", [])), "requests": per_level}
    return METHOD.format_map(_Default(values))


class _Default(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


def markdown(report: dict[str, Any], notes: str, images: list[Path], docs: Path) -> str:
    m = report.get("machine", {})
    v = m.get("versions", {})
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/render_docs.py from one bench/compare.py run; do not edit. "
        "Edit docs/benchmarks-notes.md for the analysis. -->",
        "",
        f"Run started {report.get('started_at', '?')}, took "
        f"{fmt(report.get('duration_s'), '.0f')} s: `{' '.join(report.get('command', []))}`.",
        "",
        "## The machine",
        "",
        f"- {m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('ram_total_gib')} GiB RAM, no GPU",
        f"- load average {fmt((m.get('loadavg') or [math.nan])[0], '.2f')} before the run, "
        f"{fmt((report.get('loadavg_after') or [math.nan])[0], '.2f')} after",
        f"- vLLM {v.get('vllm')}, torch {v.get('torch')}, grpcio {v.get('grpc')}, "
        f"omnistage {v.get('omnistage')}, Python {m.get('python')}",
        "",
        "## Method",
        "",
        method_text(report),
    ]
    for title, rows in sections(report):
        if len(rows) > 1:
            out += [f"## {title}", "", markdown_table(rows), ""]
    for image in images:
        rel = image.relative_to(docs.parent) if image.is_relative_to(docs.parent) else image
        out += [f"![{image.stem}]({rel.as_posix()})", ""]
    failures = [f"- {n}: {s['error']}" for n, s in _systems(report).items() if "error" in s]
    if failures:
        out += ["## Failures in this run", "", *failures, ""]
    out += [
        "## Analysis (hand-written)",
        "",
        "<!-- Included from docs/benchmarks-notes.md; the numbers above are this run's. -->",
        "",
        notes.strip() or "_No notes yet: write them in docs/benchmarks-notes.md._",
        "",
    ]
    return "\n".join(out)


# -- plots --------------------------------------------------------------------------------------


def plots(report: dict[str, Any], img_dir: Path) -> list[Path]:
    """Throughput and latency against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = {n: s["levels"] for n, s in _systems(report).items() if s.get("levels")}
    if not systems:
        return []
    img_dir.mkdir(parents=True, exist_ok=True)
    charts = [
        ("bench-throughput.png", "output tokens/s (both stages)", [("output_tok_s", "-")]),
        (
            "bench-latency.png",
            "end-to-end latency, s (solid p50, dashed p90)",
            [("latency_s_p50", "-"), ("latency_s_p90", "--")],
        ),
        (
            "bench-first-output.png",
            "final stage first output, ms (solid p50, dashed p90)",
            [("first_final_ms_p50", "-"), ("first_final_ms_p90", "--")],
        ),
    ]
    written = []
    for filename, ylabel, series in charts:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for index, (name, levels) in enumerate(systems.items()):
            xs = sorted(levels, key=int)
            for key, style in series:
                ax.plot(
                    [int(x) for x in xs],
                    [levels[x][key] for x in xs],
                    style,
                    marker="o",
                    color=f"C{index}",
                    label=LABELS.get(name, name) if style == "-" else None,
                )
        ax.set_xscale("log", base=2)
        ticks = sorted({int(x) for levels in systems.values() for x in levels})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(f"two-stage chain, run of {report.get('started_at', '?')[:10]}")
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = img_dir / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def render(json_path: Path, docs: Path, img_dir: Path, notes_path: Path) -> Path:
    report = json.loads(json_path.read_text())
    notes = notes_path.read_text() if notes_path.is_file() else ""
    images = plots(report, img_dir)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(markdown(report, notes, images, docs))
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("json", nargs="?", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS)
    parser.add_argument("--img", type=Path, default=None, help="default: <docs folder>/img")
    parser.add_argument("--notes", type=Path, default=DEFAULT_NOTES)
    args = parser.parse_args(argv)
    img = args.img or args.docs.parent / "img"
    path = render(args.json, args.docs, img, args.notes)
    print(f"wrote {path} and its plots in {img}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
