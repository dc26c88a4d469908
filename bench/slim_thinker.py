"""Trace slimming on the real thinker: how much smaller, with the same top-20 op table.

    .venv/bin/python bench/slim_thinker.py [--keep DIR] [--max-tokens 32] [--requests 4]
    .venv/bin/python bench/slim_thinker.py --trace FILE    # no engine: slim an existing trace

1. One `omnistage stage serve` of the bundled `smollm2` (vLLM on the CPU, `stage serve`'s
   defaults) with `--profiler-config` `torch_profiler_with_stack: true`. After a warm-up
   request it profiles `--requests` concurrent requests of `--max-tokens` tokens, stops the
   profile (vLLM's stop takes 15-60 s on the CPU), pulls the files with `FetchProfileFile`
   into a temporary folder (`--keep DIR` keeps them there) and stops the stage.
2. Every trace (`*.pt.trace.json*`) is then slimmed into a copy with each of these options:
   `SlimOptions()` (vLLM's idle patterns, bookkeeping args stripped); the same with
   `min_duration_us` 1, 5, 10, 20 and 50; and `drop_patterns=("*",)`, every Python frame (the
   upper bound). Per option: the size ratio original/slim (the files' gzip bytes), the events
   before and after, the slimming's wall time, and whether the top-20 op table is the same as
   the original's (same ops in the same order, same calls; self CPU, total CPU and self device
   time within 1%, as in `report_build.py`). Slimming only drops `python_function` frames, so
   the table must not change.
3. For reference, outside the option rows: the event mix of the original (events per
   category, the `python_function` share), a re-encoded copy with nothing dropped (the
   writer's own gzip, which the ratios include), and a copy without any Python frame nor
   stripped args; `1 - that / re-encoded` is the share of the gzip bytes the
   `python_function` events take.

The first option reaching `GOAL_X` (3×) with the same table is named. Results go to
`bench/results/slim_thinker.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench_machine import align_table, machine_info
from chain_systems import ChainSettings, kv_cache_env, omnistage_stage_flags, start_servers
from profile_costs import TRACE_MARK, profiler_config
from report_build import table_difference
from stage_overhead import BenchSettings, GrpcTarget, progress, run_round

from omnistage.launch import ServerProcess, stage_args
from omnistage.stage_client import AsyncStageClient
from omnistage.traces import OpStat, op_stats
from omnistage.traces.reader import TraceReader
from omnistage.traces.slimming import VLLM_IDLE_PATTERNS, SlimOptions, slim_trace_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "slim_thinker.json"
GOAL_X = 3.0
MIN_DURATIONS_US = (1, 5, 10, 20, 50)
STOP_TIMEOUT_S = 900.0  # vLLM's stop on a busy 2-core machine: well under this
MB = 1e6
TOP = 20
TOLERANCE = 0.01


def options_to_measure() -> dict[str, SlimOptions]:
    rows = {"defaults": SlimOptions()}
    for us in MIN_DURATIONS_US:
        rows[f"defaults + min {us} us"] = SlimOptions(min_duration_us=us)
    rows["drop * (every Python frame)"] = SlimOptions(drop_patterns=("*",))
    return rows


REFERENCES = {
    "re-encoded (nothing dropped)": SlimOptions(drop_patterns=(), strip_args=False),
    "no Python frames, args kept": SlimOptions(drop_patterns=("*",), strip_args=False),
}


# -- 1. the profile -------------------------------------------------------------------------------


async def profile_thinker(folder: Path, s: ChainSettings, requests: int) -> dict[str, Any]:
    """One profiled thinker stage, one session; its files pulled into `folder`."""
    os.environ.update(kv_cache_env(s))
    config = profiler_config(folder / "stage", with_stack=True)
    args = stage_args(
        name="thinker", model=s.model, profiler_config=config, extra=omnistage_stage_flags(s)
    )
    server = ServerProcess("stage thinker", args, log_path=folder / "thinker.log")
    try:
        progress("slim: starting the thinker (about 40 s)")
        await start_servers([server], progress, "slim")
        async with AsyncStageClient(server.address) as client:
            target = GrpcTarget(client)
            settings = BenchSettings(quick=False, max_tokens=s.max_tokens)
            await run_round(target, settings, 1, 0)  # warm-up
            await client.start_profile(label="slim")
            workload = await run_round(target, settings, requests, 1)
            progress(f"slim: {requests} requests profiled in {workload.wall_s:.1f} s; stopping")
            started = time.perf_counter()
            manifest = await client.stop_profile(timeout=STOP_TIMEOUT_S)
            stop_s = time.perf_counter() - started
            progress(f"slim: stop {stop_s:.1f} s; pulling {len(manifest.files)} file(s)")
            pulled = []
            for item in manifest.files:
                target_path = folder / "pulled" / item.name
                await client.fetch_file(manifest.session_id, item.name, target_path)
                pulled.append(item.name)
    finally:
        progress("slim: stopping the thinker")
        await asyncio.to_thread(server.stop)
    return {
        "requests": requests,
        "max_tokens": s.max_tokens,
        "workload_s": workload.wall_s,
        "output_tokens": workload.tokens,
        "stop_wall_s": stop_s,
        "inside_stage_s": manifest.stop_seconds,
        "files": pulled,
    }


# -- 2. slimming -----------------------------------------------------------------------------------


def event_mix(path: Path) -> dict[str, Any]:
    """Events per category (`ph=…` for events without one) and the JSON bytes."""
    counts: Counter[str] = Counter()
    with TraceReader(path, name=path.name) as reader:
        for chunk in reader.chunks():
            for ev in chunk:
                counts[ev.cat if isinstance(ev.cat, str) and ev.cat else f"ph={ev.ph}"] += 1
        json_bytes = reader.json_bytes
    total = sum(counts.values())
    return {
        "events": total,
        "json_bytes": json_bytes,
        "by_category": dict(counts.most_common()),
        "python_function_share": counts["python_function"] / total if total else 0.0,
    }


def finite(value: float) -> float | None:  # JSON has no infinity
    return value if math.isfinite(value) else None


def measure(src: Path, dst: Path, options: SlimOptions, top: list[OpStat]) -> dict[str, Any]:
    started = time.perf_counter()
    stats = slim_trace_file(src, dst, options)
    seconds = time.perf_counter() - started
    diff = table_difference(top, op_stats(dst)[:TOP])
    return {
        "options": {
            "min_duration_us": options.min_duration_us,
            "drop_patterns": "VLLM_IDLE_PATTERNS"
            if options.drop_patterns == VLLM_IDLE_PATTERNS
            else list(options.drop_patterns),
            "strip_args": options.strip_args,
        },
        "bytes_before": stats.bytes_before,
        "bytes_after": stats.bytes_after,
        "ratio_x": stats.bytes_before / stats.bytes_after,
        "events_before": stats.events_before,
        "events_after": stats.events_after,
        "args_removed": stats.args_removed,
        "flow_events_dropped": stats.flow_events_dropped,
        "slim_s": seconds,
        "top_max_rel_diff": finite(diff),
        "top_same": diff <= TOLERANCE,
    }


def slim_all(traces: list[Path], work: Path) -> dict[str, Any]:
    per_trace: dict[str, Any] = {}
    for index, src in enumerate(traces):
        progress(f"slim: {src.name}: {src.stat().st_size / MB:.2f} MB; event mix, op table")
        top = op_stats(src)[:TOP]
        rows: dict[str, Any] = {}
        refs: dict[str, Any] = {}
        for group, named in (("options", options_to_measure()), ("references", REFERENCES)):
            for slot, (name, options) in enumerate(named.items()):
                dst = work / f"slim-{index}-{group}-{slot}.json.gz"
                row = measure(src, dst, options, top)
                dst.unlink()
                (rows if group == "options" else refs)[name] = row
                progress(
                    f"slim: {name}: {row['ratio_x']:.2f}x, {row['events_after']:,} events, "
                    f"{row['slim_s']:.1f} s, top-{TOP} {'same' if row['top_same'] else 'DIFFERS'}"
                )
        reencoded = refs["re-encoded (nothing dropped)"]["bytes_after"]
        no_python = refs["no Python frames, args kept"]["bytes_after"]
        per_trace[src.name] = {
            "bytes": src.stat().st_size,
            "mix": event_mix(src),
            "top": [asdict(o) for o in top],
            "options": rows,
            "references": refs,
            "python_function_gzip_share": 1 - no_python / reencoded,
        }
    return per_trace


def totals(per_trace: dict[str, Any]) -> dict[str, Any]:
    """Each option summed over the traces: bytes, events, time; the table same in every one."""
    out: dict[str, Any] = {}
    names = list(options_to_measure())
    for name in names:
        rows = [t["options"][name] for t in per_trace.values()]
        before = sum(r["bytes_before"] for r in rows)
        after = sum(r["bytes_after"] for r in rows)
        out[name] = {
            "bytes_before": before,
            "bytes_after": after,
            "ratio_x": before / after,
            "events_before": sum(r["events_before"] for r in rows),
            "events_after": sum(r["events_after"] for r in rows),
            "slim_s": sum(r["slim_s"] for r in rows),
            "top_same": all(r["top_same"] for r in rows),
        }
    return out


def format_table(summed: dict[str, Any]) -> str:
    lines: list[tuple[str, ...]] = [
        ("option", "MB before", "MB after", "ratio", "events before", "events after", "slim s")
    ]
    lines[0] += (f"top-{TOP}",)
    for name, row in summed.items():
        lines.append(
            (
                name,
                f"{row['bytes_before'] / MB:.2f}",
                f"{row['bytes_after'] / MB:.2f}",
                f"{row['ratio_x']:.2f}x",
                f"{row['events_before']:,}",
                f"{row['events_after']:,}",
                f"{row['slim_s']:.1f}",
                "same" if row["top_same"] else "DIFFERS",
            )
        )
    return align_table(lines)


# -- the run ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trace", type=Path, action="append", help="slim this trace, no engine")
    parser.add_argument("--keep", type=Path, help="keep the pulled files in this folder")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    settings = ChainSettings(max_tokens=args.max_tokens)
    report: dict[str, Any] = {"benchmark": "slim_thinker", "machine": machine_info()}
    report["settings"] = asdict(settings) | {"requests": args.requests, "goal_x": GOAL_X}
    status = 1
    try:
        with tempfile.TemporaryDirectory(prefix="omnistage-slim-") as tmp:
            work = Path(tmp)
            if args.trace:
                traces = [path.resolve() for path in args.trace]
                report["profile"] = {"traces_given": [str(path) for path in traces]}
            else:
                folder = args.keep.resolve() if args.keep else work / "session"
                folder.mkdir(parents=True, exist_ok=True)
                report["profile"] = asyncio.run(profile_thinker(folder, settings, args.requests))
                traces = sorted(p for p in (folder / "pulled").iterdir() if TRACE_MARK in p.name)
                if args.keep:
                    report["profile"]["kept_in"] = str(folder)
            if not traces:
                raise SystemExit("no trace to slim")
            per_trace = slim_all(traces, work)
        report["traces"] = per_trace
        summed = report["totals"] = totals(per_trace)
        first = next(
            (n for n, r in summed.items() if r["ratio_x"] >= GOAL_X and r["top_same"]), None
        )
        report["first_reaching_goal"] = first
        report["all_tops_same"] = all(r["top_same"] for r in summed.values())
        for name, trace in per_trace.items():
            mix = trace["mix"]
            print(
                f"{name}: {trace['bytes'] / MB:.2f} MB gzip, {mix['json_bytes'] / MB:.1f} MB "
                f"JSON, {mix['events']:,} events, {mix['python_function_share']:.1%} "
                f"python_function ({trace['python_function_gzip_share']:.1%} of the gzip bytes)"
            )
            print("  " + ", ".join(f"{c} {n:,}" for c, n in list(mix["by_category"].items())[:8]))
        print(format_table(summed))
        goal = f"first option at >= {GOAL_X:g}x with the same top-{TOP}: {first or 'none'}"
        print(goal)
        status = 0 if report["all_tops_same"] else 1
    finally:
        report["loadavg_after"] = list(os.getloadavg())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"JSON: {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
