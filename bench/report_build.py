"""How long a profile session's report takes to build: merged timeline, summary, slimming.

Run it from the repository root on a session folder (``<output_dir>/<session_id>/`` with its
``report.json``, as ``StopProfile`` leaves it):

    .venv/bin/python bench/report_build.py examples/two-stage/profiles/<session>

The folder is copied to a temporary folder first (``--in-place`` builds in the folder itself),
then built twice, one after the other:

1. **full**: ``rebuild_report(copy)`` — timeline and summary from the original traces;
2. **slim**: ``rebuild_report(copy, slim=SlimOptions(...))`` — slimmed copies first, then
   the timeline and summary from them.

Throughput is the traces' size over the build's wall time, both as stored (gzip) and as JSON
(uncompressed). The slimmed/full ratio is the slimmed copies' bytes over the originals'
(a trace whose copy would not be smaller keeps its original and counts as 1.0).

After both builds (outside the timings), the top-20 op table of each slimmed copy is compared
with its original's: same ops in the same order, the same calls, and self CPU, total CPU and
self device time within 1% (``op_table``: the largest relative difference, per trace and
overall). Every number printed is measured in this run; results go to
``bench/results/report_build.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench_machine import align_table, machine_info

from omnistage.traces import OpStat, load_trace, op_stats, slim_copy_path
from omnistage.traces.report import ReportFiles, rebuild_report
from omnistage.traces.slimming import VLLM_IDLE_PATTERNS, SlimOptions, SlimStats
from omnistage.traces.timeline import find_traces

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "report_build.json"
MB = 1e6
TOP = 20
TOLERANCE = 0.01


def trace_sizes(session_dir: Path) -> dict[str, int]:
    """Stored and uncompressed bytes of the session's original traces, and how many."""
    stored = raw = 0
    sources = find_traces(session_dir)
    for source in sources:
        stored += source.path.stat().st_size
        opener = gzip.open if source.path.name.endswith(".gz") else open
        with opener(source.path, "rb") as fh:
            while block := fh.read(1 << 22):
                raw += len(block)
    return {"files": len(sources), "stored_bytes": stored, "json_bytes": raw}


def build(session_dir: Path, slim: SlimOptions | None) -> tuple[float, ReportFiles, list[str]]:
    messages: list[str] = []
    started = time.perf_counter()
    files = rebuild_report(session_dir, slim=slim, progress=messages.append)
    return time.perf_counter() - started, files, messages


def table_difference(full: list[OpStat], slim: list[OpStat]) -> float:
    """The largest relative difference between two top tables; inf if their rows differ."""
    if [(o.name, o.calls) for o in full] != [(o.name, o.calls) for o in slim]:
        return float("inf")
    worst = 0.0
    for a, b in zip(full, slim, strict=True):
        for x, y in (
            (a.self_cpu_us, b.self_cpu_us),
            (a.total_cpu_us, b.total_cpu_us),
            (a.self_device_us, b.self_device_us),
        ):
            if x != y:
                worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    return worst


def op_table_check(session_dir: Path, slim_stats: dict[str, SlimStats]) -> dict[str, Any]:
    """Each slimmed copy's top-20 op table against its original's."""
    per_trace: dict[str, float] = {}
    for rel, stats in slim_stats.items():
        if not stats.written:
            continue
        original = session_dir / rel
        full = op_stats(load_trace(original))[:TOP]
        slim = op_stats(load_trace(slim_copy_path(original)))[:TOP]
        per_trace[rel] = table_difference(full, slim)
    worst = max(per_trace.values(), default=0.0)

    def finite(value: float) -> float | None:  # JSON has no infinity: None for other rows
        return value if math.isfinite(value) else None

    return {
        "top": TOP,
        "tolerance": TOLERANCE,
        "max_rel_diff": finite(worst),
        "within_tolerance": worst <= TOLERANCE,
        "traces": {rel: finite(diff) for rel, diff in per_trace.items()},
    }


def run(session_dir: Path, slim: SlimOptions) -> dict[str, Any]:
    sizes = trace_sizes(session_dir)
    rows: dict[str, Any] = {}
    slim_stats: dict[str, SlimStats] = {}
    for name, options in (("full", None), ("slim", slim)):
        seconds, files, messages = build(session_dir, options)
        timeline = json.loads(gzip.decompress(files.timeline.read_bytes()))["metadata"]
        total = files.slim_total
        slimming = files.slimming()
        rows[name] = {
            "build_s": seconds,
            "stored_mb_per_s": sizes["stored_bytes"] / MB / seconds,
            "json_mb_per_s": sizes["json_bytes"] / MB / seconds,
            "timeline_bytes": files.timeline.stat().st_size,
            "timeline_events": sum(t["events"] for t in timeline["traces"]),
            "slim_bytes_before": total.bytes_before if options else None,
            "slim_bytes_after": total.bytes_after if options else None,
            "slim_bytes_saved": total.bytes_saved if options else None,
            "slim_ratio": total.size_ratio if options else None,
            "slim_events_before": total.events_before if options else None,
            "slim_events_after": total.events_after if options else None,
            "slim_args_removed": total.args_removed if options else None,
            "slim_copies_written": slimming.copies_written if slimming else None,
            "slim_per_trace": {
                rel: {
                    "bytes_before": st.bytes_before,
                    "bytes_after": st.bytes_after,
                    "ratio": st.size_ratio,
                    "events_before": st.events_before,
                    "events_after": st.events_after,
                    "written": st.written,
                }
                for rel, st in files.slim_stats.items()
            }
            if options
            else None,
            "progress": messages,
        }
        if options:
            slim_stats = dict(files.slim_stats)
    return {
        "traces": sizes,
        "builds": rows,
        "op_table": op_table_check(session_dir, slim_stats),
    }


def format_table(result: dict[str, Any]) -> str:
    header = (
        "build",
        "time s",
        "MB/s (gz)",
        "MB/s (json)",
        "timeline MB",
        "events",
        "traces MB",
        "slim/full",
        f"top-{TOP} ops Δ",
    )
    lines = [header]
    check = result.get("op_table") or {}
    for name, row in result["builds"].items():
        ratio = row["slim_ratio"]
        sizes = "-"
        diff = "-"
        if ratio is not None:
            sizes = f"{row['slim_bytes_before'] / MB:.2f} → {row['slim_bytes_after'] / MB:.2f}"
            worst = check.get("max_rel_diff")
            verdict = "ok" if check.get("within_tolerance") else f"OVER {TOLERANCE:.0%}"
            diff = f"{'rows differ' if worst is None else f'{worst:.2%}'} {verdict}"
        lines.append(
            (
                name,
                f"{row['build_s']:.2f}",
                f"{row['stored_mb_per_s']:.2f}",
                f"{row['json_mb_per_s']:.1f}",
                f"{row['timeline_bytes'] / MB:.2f}",
                f"{row['timeline_events']:,}",
                sizes,
                "-" if ratio is None else f"{ratio:.3f}",
                diff,
            )
        )
    return align_table(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("session_dir", type=Path, help="a profile session folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON report")
    parser.add_argument("--in-place", action="store_true", help="build in the folder itself")
    parser.add_argument(
        "--min-duration-us", type=float, default=0.0, help="slimming: drop shorter Python frames"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    source: Path = args.session_dir.resolve()
    if not (source / "report.json").is_file():
        parser.error(f"{source} has no report.json: give a session folder")
    slim = SlimOptions(min_duration_us=args.min_duration_us, drop_patterns=VLLM_IDLE_PATTERNS)
    report: dict[str, Any] = {
        "benchmark": "report_build",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "session_dir": str(source),
        "machine": machine_info(),
        "slim_options": {
            "min_duration_us": slim.min_duration_us,
            "drop_patterns": slim.drop_patterns,
            "strip_args": slim.strip_args,
        },
    }
    with tempfile.TemporaryDirectory(prefix="omnistage-report-bench-") as tmp:
        target = source if args.in_place else Path(tmp) / source.name
        if not args.in_place:
            shutil.copytree(source, target)
        report |= run(target, slim)
    report["loadavg_after"] = list(os.getloadavg())
    out: Path = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    sizes = report["traces"]
    print(
        f"session {source.name}: {sizes['files']} traces, {sizes['stored_bytes'] / MB:.2f} MB "
        f"stored, {sizes['json_bytes'] / MB:.1f} MB of JSON; {report['machine']['nproc']} CPUs, "
        f"load {report['machine']['loadavg'][0]:.2f} before, {report['loadavg_after'][0]:.2f} after"
    )
    print(format_table(report))
    builds = report["builds"]
    print(
        json.dumps({k: {m: v for m, v in r.items() if m != "progress"} for k, r in builds.items()})
    )
    print(f"JSON: {out}")
    return 0 if report["op_table"]["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
