"""omnistage against what users would otherwise run: the same two-stage chain (the bundled
thinker → rewriter of examples/two-stage/pipeline.yaml) through vLLM engines in one process
(the lower bound), omnistage's gRPC stages and orchestrator, and two chained `vllm serve`
OpenAI servers; then profiling costs and tensor transfer. One system's engines at a time.

    .venv/bin/python bench/compare.py [--quick] [--systems inprocess,omnistage,openai]
        [--levels 1,4,16] [--requests N] [--max-tokens N] [--parts compare,profile,tensor]

Writes bench/results/bench.json; `bench/render_docs.py` turns it into docs/benchmarks.md.
Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench_machine import machine_info
from chain_systems import PROMPTS, SYSTEM_STARTERS, SYSTEMS, Chain, ChainSettings
from compare_stats import closed_loop, ratios_to_baseline, summarize_level
from proc_cpu import cpu_seconds_by_role, sample
from render_docs import text_report
from stage_overhead import progress

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "bench.json"
PARTS = ("compare", "profile", "tensor")
FULL_REQUESTS = {1: 6, 4: 12, 16: 32}
QUICK_REQUESTS = {1: 2, 4: 4, 16: 16}


def requests_per_level(levels: list[int], *, quick: bool, override: int) -> dict[int, int]:
    """How many requests each level sends: --requests, else the plan, else 2 per caller."""
    plan = QUICK_REQUESTS if quick else FULL_REQUESTS
    return {c: override or plan.get(c, max(4, 2 * c)) for c in levels}


async def measure_system(
    chain: Chain, name: str, plan: dict[int, int], warmup: int
) -> dict[str, Any]:
    for index in range(warmup):
        await chain.one(10_000 + index)
    progress(f"{name}: warm-up done ({warmup} request)")
    levels: dict[str, Any] = {}
    sent = 0
    for concurrency, count in plan.items():
        progress(f"{name}: concurrency {concurrency}, {count} requests")
        load = os.getloadavg()[0]
        before = sample(chain.roots)
        records, window = await closed_loop(chain.one, concurrency, count, first=sent)
        cpu = cpu_seconds_by_role(before, sample(chain.roots))
        sent += count
        summary = summarize_level(concurrency, records, window, cpu)
        summary["loadavg_1min"] = [load, os.getloadavg()[0]]
        levels[str(concurrency)] = summary
        progress(
            f"{name}: c={concurrency}: {summary['output_tok_s']:.1f} tok/s, "
            f"{summary['requests_per_s']:.2f} req/s, p50 {summary['latency_s_p50']:.2f} s, "
            f"CPU outside engines {summary['cpu_ms_outside_engines_per_request']:.0f} ms/request"
        )
    return levels


async def run_compare(
    s: ChainSettings, systems: list[str], plan: dict[int, int], warmup: int, out: dict[str, Any]
) -> None:
    """Fill `out` system by system, so a failure keeps what was measured."""
    with tempfile.TemporaryDirectory(prefix="omnistage-compare-") as tmp:
        for name in systems:
            progress(f"== {name}: starting")
            started = time.perf_counter()
            entry: dict[str, Any] = {}
            out[name] = entry
            try:
                async with SYSTEM_STARTERS[name](s, Path(tmp), progress) as chain:
                    entry["ready_s"] = time.perf_counter() - started
                    entry["levels"] = await measure_system(chain, name, plan, warmup)
            except Exception as exc:  # noqa: BLE001 - one system's failure keeps the others'
                entry["error"] = f"{type(exc).__name__}: {exc}"
                progress(f"{name}: FAILED: {entry['error']}")
            entry["total_s"] = time.perf_counter() - started
            progress(f"== {name}: done in {entry['total_s']:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="16 tokens, fewer requests")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="which, in order")
    parser.add_argument("--levels", default="1,4,16", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (override)")
    parser.add_argument("--max-tokens", type=int, default=0, help="per stage (32; quick 16)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests per system")
    parser.add_argument("--parts", default=",".join(PARTS), help="compare, profile, tensor")
    parser.add_argument("--with-stack", action="store_true", help="profile with Python stacks")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for key, allowed in (("systems", SYSTEMS), ("parts", PARTS)):
        chosen = [x for x in getattr(args, key).split(",") if x]
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            parser.error(f"--{key}: unknown {unknown}; choose from {', '.join(allowed)}")
        setattr(args, key, chosen)
    args.levels = [int(x) for x in args.levels.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = ChainSettings(max_tokens=args.max_tokens or (16 if args.quick else 32))
    plan = requests_per_level(args.levels, quick=args.quick, override=args.requests)
    out: Path = args.out.resolve()
    report: dict[str, Any] = {
        "benchmark": "compare",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv],
        "machine": machine_info(),
        "settings": {
            **asdict(settings),
            "quick": args.quick,
            "systems": args.systems,
            "parts": args.parts,
            "requests_per_level": {str(c): n for c, n in plan.items()},
            "warmup_requests": args.warmup,
            "prompts": list(PROMPTS),
        },
    }
    started = time.perf_counter()
    try:
        if "compare" in args.parts:
            systems: dict[str, Any] = {}
            report["compare"] = {"systems": systems}
            asyncio.run(run_compare(settings, args.systems, plan, args.warmup, systems))
            levels = {n: e["levels"] for n, e in systems.items() if "levels" in e}
            report["compare"]["ratios_to_inprocess"] = ratios_to_baseline(levels, "inprocess")
        if "profile" in args.parts:
            from profile_costs import run_profile_costs

            report["profile"] = {}
            asyncio.run(
                run_profile_costs(
                    settings, report["profile"], with_stack=args.with_stack, quick=args.quick
                )
            )
        if "tensor" in args.parts:
            from tensor_transfer import run_tensor_transfer

            report["tensor"] = {}
            asyncio.run(run_tensor_transfer(report["tensor"], quick=args.quick))
    finally:
        report["duration_s"] = time.perf_counter() - started
        report["loadavg_after"] = list(os.getloadavg())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(text_report(report))
    print(f"JSON: {out}  (render: .venv/bin/python bench/render_docs.py {out})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
