"""``summary.md``: where a profile session's time went, stage by stage, in one page.

Definitions used in the summary:

* **top ops**: the op table (:mod:`omnistage.traces.optable`) of the stage's traces (all its
  files merged), by self CPU time; and by self device time when the traces have device events;
* **profiled window**: from the first to the last op (host or device) of any profiled stage,
  on the orchestrator's clock (each stage's trace shifted by its clock offset);
* **busy share**: the time during which the stage ran at least one op — the union of its host
  ops' intervals (``cpu_op``/``user_annotation``, on any of its threads, nested ops counted
  once) — over the profiled window. Device busy share likewise, from its device events;
* **request latency by stage**: from the orchestrator's spans (start → end of each request in
  each stage), p50 and p90 with linear interpolation;
* **dominant stage**: the stage with the largest sum of span durations over the requests that
  overlap the profiled window (all requests when no trace was read);
* **critical path**: per request, the segments that bounded its time to the final stage's
  first output and its end-to-end time (:mod:`omnistage.traces.critical` gives the rule), in
  :mod:`omnistage.traces.critical_report`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omnistage.traces.clock import ClockEstimate, resolve_clock
from omnistage.traces.critical_report import critical_section
from omnistage.traces.events import slim_copy_path
from omnistage.traces.html import write_html
from omnistage.traces.optable import OpStat
from omnistage.traces.slimming import SlimStats
from omnistage.traces.spans import RequestSpan
from omnistage.traces.stats import Intervals, StageTraceStats, collect_stats
from omnistage.traces.steps import attributed_paths
from omnistage.traces.timeline import (
    PROTO_TIMELINE_NAME,
    TIMELINE_NAME,
)
from omnistage.traces.units import mb as _mb
from omnistage.traces.units import ms as _ms
from omnistage.traces.units import pct as _pct
from omnistage.traces.units import percentile as _percentile
from omnistage.types import RequestCriticalPath

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.md"
_NAME_WIDTH = 70


def write_summary(
    session_dir: Path,
    *,
    report: Mapping[str, Any],
    spans: Sequence[RequestSpan],
    clocks: Mapping[str, ClockEstimate],
    top: int = 15,
    collected: Mapping[str, StageTraceStats] | None = None,
    slim_stats: Mapping[str, SlimStats] | None = None,
    progress: Callable[[str], None] | None = None,
    warnings: Sequence[str] = (),
    paths: Sequence[RequestCriticalPath] | None = None,
) -> Path:
    """Write ``session_dir/summary.md``, and ``summary.html`` beside it
    (:mod:`omnistage.traces.html`), and return the path of ``summary.md``.

    ``collected`` is what the timeline's merge found (:func:`stats_from_timeline`); without
    it the traces are read here. ``slim_stats`` (per trace, relative path)
    lists the slimmed copies and what they saved; when given (even empty), the total saved is
    stated too. ``paths`` are the session's critical paths with their step records
    (:func:`~omnistage.traces.steps.attributed_paths`); without them they are made here.
    """
    session_dir = Path(session_dir)
    stages = collected if collected is not None else collect_stats(session_dir, clocks, progress)
    window = (
        min((s.first_us for s in stages.values()), default=math.inf),
        max((s.last_us for s in stages.values()), default=-math.inf),
    )
    lines = [f"# Profile session {report.get('session_id', session_dir.name)}", ""]
    lines += _overview(session_dir, report, spans, window)
    lines += _problems_section(stages, warnings)
    lines += _ops_sections(stages, window, top)
    lines += _request_section(spans, window)
    if paths is None:
        paths = attributed_paths(spans, {key: s.steps for key, s in stages.items()})
    lines += critical_section(paths, spans)
    lines += _clock_section(clocks, stages)
    lines += _files_section(session_dir, slim_stats)
    path = session_dir / SUMMARY_NAME
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    logger.info("summary %s written", path)
    write_html(session_dir, report=report, spans=spans, stages=stages, top=top)
    return path


def _problems_section(stages: Mapping[str, StageTraceStats], warnings: Sequence[str]) -> list[str]:
    problems = [p for s in stages.values() for p in s.problems]
    problems += [w for w in warnings if not any(w.endswith(p) for p in problems)]
    if not problems:
        return []
    lines = ["## Trace problems", "", "Every other trace was merged; these files stay on disk.", ""]
    return [*lines, *(f"- {p}" for p in problems), ""]


def _overview(
    session_dir: Path,
    report: Mapping[str, Any],
    spans: Sequence[RequestSpan],
    window: tuple[float, float],
) -> list[str]:
    results = [r for r in report.get("stages", []) if isinstance(r, Mapping)]
    failed = [r for r in results if not r.get("ok", True)]
    lines = [
        f"- stages profiled: {len(results)} ({len(failed)} failed)",
        f"- requests seen: {len({s.request_id for s in spans})}",
    ]
    if report.get("timing_only"):
        lines[0] = (
            f"- timing only: spans, stage times and clocks of {len(results)} stage replicas; "
            "no stage's torch profiler ran, so there are no traces or op tables"
        )
    if window[1] > window[0]:
        lines.append(f"- profiled window: {_ms(window[1] - window[0])}")
    if (session_dir / TIMELINE_NAME).exists():
        lines.append(f"- merged timeline: [{TIMELINE_NAME}]({TIMELINE_NAME})")
    if (session_dir / PROTO_TIMELINE_NAME).exists():
        lines.append(
            f"- for the Perfetto UI (ui.perfetto.dev, faster to open): "
            f"[{PROTO_TIMELINE_NAME}]({PROTO_TIMELINE_NAME})"
        )
    if failed:
        lines += ["", "## Failed stages", ""]
        for r in failed:
            where = f" ({r.get('replica')})" if r.get("replica") else ""
            lines.append(
                f"- **{r.get('stage', '?')}**{where}: {r.get('error') or 'no error given'}"
            )
    return [*lines, ""]


def _ops_sections(
    stages: Mapping[str, StageTraceStats], window: tuple[float, float], top: int
) -> list[str]:
    span_us = window[1] - window[0]
    lines = ["## Stages", ""]
    if not stages:
        return [*lines, "No trace was read.", ""]
    lines += ["| stage | busy (host) | share of window | busy (device) | share of window |"]
    lines += ["| --- | ---: | ---: | ---: | ---: |"]
    for key, s in stages.items():
        host, device = _length(s.host_busy), _length(s.device_busy)
        dev = [_ms(device), _pct(device, span_us)] if s.device_busy[0].size else ["–", "–"]
        lines.append(f"| {key} | {_ms(host)} | {_pct(host, span_us)} | {dev[0]} | {dev[1]} |")
    lines += [
        "",
        "Busy: the time during which the stage ran at least one op (host: `cpu_op` and "
        "`user_annotation` events on any of its threads, nested ops counted once; device: its "
        "kernels, memcpy and memset). Share: busy time over the profiled window, from the first "
        "to the last event of any profiled stage on the orchestrator's clock.",
        "",
    ]
    for key, s in stages.items():
        ops = sorted(s.ops.values(), key=lambda o: (-o.self_cpu_us, -o.self_device_us, o.name))
        lines += [f"### {key}: top {top} ops by self CPU time", ""]
        lines += [f"From {', '.join(f'`{f}`' for f in s.files)}.", ""]
        lines += _op_table(ops, top, by_device=False)
        if any(o.self_device_us > 0 for o in ops):
            ops.sort(key=lambda o: (-o.self_device_us, -o.self_cpu_us, o.name))
            lines += [f"### {key}: top {top} ops by self device time", ""]
            lines += _op_table(ops, top, by_device=True)
    return lines


def _op_table(ops: Sequence[OpStat], top: int, *, by_device: bool) -> list[str]:
    cpu_total = math.fsum(o.self_cpu_us for o in ops)
    dev_total = math.fsum(o.self_device_us for o in ops)
    with_device = dev_total > 0
    head = "| op | calls | self CPU | self CPU % | CPU total |"
    rule = "| --- | ---: | ---: | ---: | ---: |"
    if with_device:
        head += " self device | self device % |"
        rule += " ---: | ---: |"
    lines = [head, rule]
    for o in ops[: max(top, 0)]:
        if by_device and o.self_device_us <= 0:
            break
        row = f"| {_name(o.name)} | {o.calls} | {_ms(o.self_cpu_us)} | "
        row += f"{_pct(o.self_cpu_us, cpu_total)} | {_ms(o.total_cpu_us)} |"
        if with_device:
            row += f" {_ms(o.self_device_us)} | {_pct(o.self_device_us, dev_total)} |"
        lines.append(row)
    return [*lines, ""]


def _request_section(spans: Sequence[RequestSpan], window: tuple[float, float]) -> list[str]:
    lines = ["## Requests", ""]
    if not spans:
        return [*lines, "No request spans were recorded in this session.", ""]
    lines.append("Per stage, over every request (times from the orchestrator's spans):")
    lines += ["", "| stage | requests | latency p50 | latency p90 | first output p50 |"]
    lines[-1] += " first output p90 | queue p50 | queue p90 | handoff p50 | handoff p90 |"
    lines.append("| --- |" + " ---: |" * 9)
    by_stage: dict[str, list[RequestSpan]] = {}
    for span in sorted(spans, key=lambda s: (s.stage_index, s.stage)):
        by_stage.setdefault(span.stage, []).append(span)
    for stage, group in by_stage.items():
        cells = [str(len({s.request_id for s in group}))]
        for values in (
            [(s.end_unix_ns - s.start_unix_ns) / 1e3 for s in group],
            [
                (s.first_output_unix_ns - s.start_unix_ns) / 1e3
                for s in group
                if s.first_output_unix_ns
            ],
            [s.queue_time_s * 1e6 for s in group],
            [s.handoff_s * 1e6 for s in group],
        ):
            cells += [_ms(_percentile(values, 50)), _ms(_percentile(values, 90))]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("")
    lo, hi = window
    inside = [s for s in spans if s.end_unix_ns / 1e3 >= lo and s.start_unix_ns / 1e3 <= hi]
    scope = "that overlap the profiled window" if hi > lo else "of the session"
    if not inside:
        return [*lines, "No request overlaps the profiled window.", ""]
    totals: dict[str, float] = {}
    slowest: dict[str, int] = {}
    requests: dict[str, list[RequestSpan]] = {}
    for s in inside:
        totals[s.stage] = totals.get(s.stage, 0.0) + (s.end_unix_ns - s.start_unix_ns) / 1e3
        requests.setdefault(s.request_id, []).append(s)
    for group in requests.values():
        worst = max(group, key=lambda s: s.end_unix_ns - s.start_unix_ns)
        slowest[worst.stage] = slowest.get(worst.stage, 0) + 1
    dominant = max(totals, key=lambda k: totals[k])
    lines.append(
        f"**Dominant stage: {dominant}**, with {_pct(totals[dominant], sum(totals.values()))} of "
        f"the time that the {len(requests)} requests {scope} spent in stages; it was the "
        f"slowest stage of {slowest.get(dominant, 0)} of them."
    )
    return [*lines, ""]


def _clock_section(
    clocks: Mapping[str, ClockEstimate], stages: Mapping[str, StageTraceStats]
) -> list[str]:
    lines = [
        "## Clock offsets",
        "",
        "Stage clock minus orchestrator clock, from GetInfo round trips:",
        "",
    ]
    lines += [
        "| stage | offset | ± error | round trip | samples |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, c in sorted(clocks.items()):
        times = [_ms(c.offset_ns / 1e3), _ms(c.error_ns / 1e3), _ms(c.rtt_ns / 1e3)]
        lines.append(f"| {key} | {' | '.join(times)} | {c.samples} |")
    for key in stages:
        stage, _, replica = key.partition("/")
        if resolve_clock(clocks, stage, replica)[0] is None:
            lines.append(f"| {key} | no estimate: 0 assumed | – | – | 0 |")
    return [*lines, ""]


def _files_section(session_dir: Path, slim_stats: Mapping[str, SlimStats] | None) -> list[str]:
    lines = ["## Files", ""]
    if slim_stats is not None:
        lines.append(_slim_line(slim_stats))
    slim_stats = slim_stats or {}
    if (session_dir / TIMELINE_NAME).exists():
        lines.append(f"- [{TIMELINE_NAME}]({TIMELINE_NAME}): every stage and request on one clock")
    for table in sorted(session_dir.glob("*/**/*profiler_out*.txt")):
        rel = table.relative_to(session_dir).as_posix()
        lines.append(f"- [{rel}]({rel}): the stage's own op table")
    for rel, st in sorted(slim_stats.items()):
        if not st.written:
            continue
        copy = slim_copy_path(session_dir / rel).relative_to(session_dir).as_posix()
        lines.append(
            f"- [{copy}]({copy}): {_mb(st.bytes_after)} instead of {_mb(st.bytes_before)} "
            f"({st.events_dropped:,} of {st.events_before:,} events dropped; same op table)"
        )
    return [*lines, ""]


def _slim_line(slim_stats: Mapping[str, SlimStats]) -> str:
    total = SlimStats.total(slim_stats.values())
    copies = sum(1 for st in slim_stats.values() if st.written)
    line = (
        f"- slimming: **{total.bytes_saved:,} bytes saved** ({_mb(total.bytes_before)} → "
        f"{_mb(total.bytes_after)}, size ratio {total.size_ratio:.2f}; "
        f"{total.events_dropped:,} of {total.events_before:,} events dropped; "
        f"{copies} of {len(slim_stats)} traces got a slimmed copy)"
    )
    if total.bytes_saved <= 0:
        line += (
            ". Nothing was saved: idle loops are dropped by their Python frames, which a "
            "trace only holds when the stage profiles with `torch_profiler_with_stack: true`"
        )
    return line


def _length(intervals: Intervals) -> float:
    return float(np.sum(intervals[1] - intervals[0]))


def _name(name: str) -> str:
    short = name if len(name) <= _NAME_WIDTH else name[: _NAME_WIDTH - 1] + "…"
    return "`" + short.replace("`", "'").replace("|", "\\|") + "`"
