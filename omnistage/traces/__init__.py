"""Profile traces: reading, typed events, nesting, op tables, slimming, merging, summaries.

One package that the stage (its op-table fallback), the orchestrator and the CLI all use.
Traces are read as streams of typed chunks (:mod:`~omnistage.traces.reader`), never whole;
docs/traces.md says how, and why these libraries.
"""

from omnistage.traces.clock import ClockEstimate, ClockSample, combine, estimate_offset
from omnistage.traces.events import Event, TraceError, slim_copy_path
from omnistage.traces.optable import OpStat, build_op_table, format_op_table, op_stats
from omnistage.traces.reader import TraceReader, load_trace, read_events
from omnistage.traces.report import ReportFiles, read_session, rebuild_report
from omnistage.traces.slimming import VLLM_IDLE_PATTERNS, SlimOptions, SlimStats
from omnistage.traces.spans import ORCHESTRATOR_PID, RequestSpan, span_from_mapping
from omnistage.traces.timeline import PROTO_TIMELINE_NAME, TIMELINE_NAME, build_timeline

__all__ = [
    "ORCHESTRATOR_PID",
    "PROTO_TIMELINE_NAME",
    "TIMELINE_NAME",
    "VLLM_IDLE_PATTERNS",
    "ClockEstimate",
    "ClockSample",
    "Event",
    "OpStat",
    "ReportFiles",
    "RequestSpan",
    "SlimOptions",
    "SlimStats",
    "TraceError",
    "TraceReader",
    "build_op_table",
    "build_timeline",
    "combine",
    "estimate_offset",
    "format_op_table",
    "load_trace",
    "op_stats",
    "read_events",
    "read_session",
    "rebuild_report",
    "slim_copy_path",
    "span_from_mapping",
]
