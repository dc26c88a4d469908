"""The per-stage figures that a session diff and ``summary.html`` show, from what the trace
package already read: the stage's traces (:class:`~omnistage.traces.stats.StageTraceStats`)
and the orchestrator's request spans.

Definitions, the same as ``summary.md``'s (:mod:`omnistage.traces.summary`):

* **busy share**: the union of the stage's host ops' intervals (device: its device events)
  over the profiled window, from the first to the last event of any profiled stage. The
  replicas of a stage are joined: busy while at least one replica ran an op;
* **latency p50/p90**: of each request's span in the stage (start → end), with linear
  interpolation; **end to end**: from a request's first span start to its last span end;
* **engine steps**: the calls of the annotations that mark one engine step each (vLLM's
  ``execute_context_*``, the torch engine's ``omnistage.step``), counted in the op table;
* **critical path**: of each complete request (:mod:`omnistage.traces.critical`), the p50
  over requests of the stage's share of the time to first output and of the end-to-end time,
  and of each segment kind of the stage in the end-to-end time; **model steps**: the p50 of
  the stage's step time over its compute on the path (:mod:`omnistage.traces.steps`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from omnistage.traces.critical import shares
from omnistage.traces.optable import OpStat
from omnistage.traces.spans import RequestSpan
from omnistage.traces.stats import StageTraceStats
from omnistage.traces.steps import STEP_PREFIXES
from omnistage.types import RequestCriticalPath


@dataclass(frozen=True)
class StageFigures:
    """One stage of one session (all its replicas); times in µs."""

    stage: str
    traced: bool
    """Whether any of its traces was read (else the busy shares are None, the ops empty)."""
    busy_us: float = 0.0
    busy_share: float | None = None
    """Host busy time over the profiled window, 0 to 1."""
    device_busy_us: float = 0.0
    device_busy_share: float | None = None
    """Device busy time over the window; None without device events."""
    requests: int = 0
    """Distinct requests with a span in the stage."""
    latency_p50_us: float | None = None
    latency_p90_us: float | None = None
    first_output_p50_us: float | None = None
    steps: int = 0
    """Engine steps counted in its traces (0: none can be counted)."""
    ops: Mapping[str, OpStat] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    path_first_share: float | None = None
    """p50 over requests of its share (0 to 1) of the time to first output; None without
    critical paths."""
    path_share: float | None = None
    """The same, of the end-to-end time."""
    path_kinds: Mapping[str, float] = field(default_factory=dict)
    """Per segment kind of the stage: p50 of its share of the end-to-end time."""
    model_steps: float | None = None
    """p50 of the stage's engine-step time over its compute on the path; None where the
    stage is untraced or holds no steps."""


@dataclass(frozen=True)
class SessionFigures:
    """Every stage's figures, in pipeline order, and the requests' end-to-end latency."""

    window_us: float
    """The profiled window; 0 when no trace was read."""
    stages: Mapping[str, StageFigures]
    requests: int
    latency_p50_us: float | None
    latency_p90_us: float | None
    first_output_p50_us: float | None = None
    """Time to the final stage's first output, of the complete requests' critical paths."""
    first_output_p90_us: float | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile with linear interpolation; None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def count_steps(ops: Iterable[OpStat]) -> int:
    return sum(op.calls for op in ops if op.name.startswith(STEP_PREFIXES))


def stage_of(key: str) -> str:
    """The stage of a stats key (``stage`` or ``stage/replica``)."""
    return key.partition("/")[0]


def window_of(collected: Mapping[str, StageTraceStats]) -> float:
    first = min((s.first_us for s in collected.values()), default=math.inf)
    last = max((s.last_us for s in collected.values()), default=-math.inf)
    return last - first if last > first else 0.0


def session_figures(
    collected: Mapping[str, StageTraceStats],
    spans: Sequence[RequestSpan],
    *,
    order: Mapping[str, int] | None = None,
    names: Iterable[str] = (),
    paths: Sequence[RequestCriticalPath] = (),
) -> SessionFigures:
    """Per stage, what :mod:`omnistage.traces.figures` defines; ``order`` (stage → index, as
    the report lists them) and the spans' stage indices put the stages in pipeline order.
    ``names`` adds stages that have neither traces nor spans (a failed stage); ``paths``
    (with their step split, :func:`~omnistage.traces.steps.attributed_paths`) give the
    critical-path figures."""
    window = window_of(collected)
    by_stage = _join_replicas(collected)
    spans_of: dict[str, list[RequestSpan]] = {}
    for span in spans:
        spans_of.setdefault(span.stage, []).append(span)
    stages = {*by_stage, *spans_of, *names}
    ranked = sorted(stages, key=lambda s: _rank(s, order or {}, spans_of))
    figures = {s: _stage(s, by_stage.get(s), spans_of.get(s, []), window) for s in ranked}
    figures = {s: _with_paths(f, paths) for s, f in figures.items()}
    ends = _end_to_end(spans)
    firsts = [p.time_to_first_output_s * 1e6 for p in paths]
    return SessionFigures(
        window_us=window,
        stages=figures,
        requests=len(ends),
        latency_p50_us=percentile(ends, 50),
        latency_p90_us=percentile(ends, 90),
        first_output_p50_us=percentile(firsts, 50),
        first_output_p90_us=percentile(firsts, 90),
    )


def _with_paths(figures: StageFigures, paths: Sequence[RequestCriticalPath]) -> StageFigures:
    """The stage's critical-path figures (module docstring), from the requests' paths."""
    if not paths:
        return figures
    stage = figures.stage

    def p50(values: Sequence[float] | None) -> float | None:
        return percentile(values or [], 50)

    kinds = shares(paths, first=False)
    steps = [
        r.step_ns / r.compute_ns
        for p in paths
        for r in p.steps
        if r.stage == stage and r.compute_ns
    ]
    return replace(
        figures,
        path_first_share=p50(shares(paths, first=True, by="stage").get((stage, ""))),
        path_share=p50(shares(paths, first=False, by="stage").get((stage, ""))),
        path_kinds={
            kind: share
            for (st, kind), values in kinds.items()
            if st == stage and (share := p50(values)) is not None
        },
        model_steps=p50(steps),
    )


def _join_replicas(collected: Mapping[str, StageTraceStats]) -> dict[str, StageTraceStats]:
    """One :class:`StageTraceStats` per stage: its replicas' ops summed, busy times joined."""
    keys: dict[str, list[str]] = {}
    for key in collected:
        keys.setdefault(stage_of(key), []).append(key)
    joined: dict[str, StageTraceStats] = {}
    for stage, group in keys.items():
        if len(group) == 1:
            joined[stage] = collected[group[0]]
            continue
        both = joined[stage] = StageTraceStats(stage)
        for key in group:
            part = collected[key]
            if part.files:
                replica = key.partition("/")[2]
                names = ", ".join(f"{replica}/{f}" if replica else f for f in part.files)
                ops = list(part.ops.values())
                both.add(
                    names,
                    ops,
                    part.host_busy,
                    part.device_busy,
                    part.first_us,
                    part.last_us,
                    part.steps,
                )
    return joined


def _rank(
    stage: str, order: Mapping[str, int], spans_of: Mapping[str, list[RequestSpan]]
) -> tuple[float, float, str]:
    listed = float(order.get(stage, math.inf))
    spans = spans_of.get(stage)
    index = float(min(s.stage_index for s in spans)) if spans else listed
    return (index, listed, stage)


def _stage(
    stage: str, stats: StageTraceStats | None, spans: Sequence[RequestSpan], window: float
) -> StageFigures:
    latencies = [(s.end_unix_ns - s.start_unix_ns) / 1e3 for s in spans]
    first = [
        (s.first_output_unix_ns - s.start_unix_ns) / 1e3 for s in spans if s.first_output_unix_ns
    ]
    base = StageFigures(
        stage,
        traced=False,
        requests=len({s.request_id for s in spans}),
        latency_p50_us=percentile(latencies, 50),
        latency_p90_us=percentile(latencies, 90),
        first_output_p50_us=percentile(first, 50),
    )
    if stats is None or not stats.files:
        return base
    busy = float(np.sum(stats.host_busy[1] - stats.host_busy[0]))
    device = float(np.sum(stats.device_busy[1] - stats.device_busy[0]))
    return replace(
        base,
        traced=True,
        busy_us=busy,
        busy_share=busy / window if window > 0 else None,
        device_busy_us=device,
        device_busy_share=device / window if window > 0 and stats.device_busy[0].size else None,
        steps=count_steps(stats.ops.values()),
        ops=dict(stats.ops),
        files=tuple(stats.files),
    )


def _end_to_end(spans: Sequence[RequestSpan]) -> list[float]:
    """Per request, from its first span's start to its last span's end, in µs."""
    edges: dict[str, tuple[int, int]] = {}
    for s in spans:
        lo, hi = edges.get(s.request_id, (s.start_unix_ns, s.end_unix_ns))
        edges[s.request_id] = (min(lo, s.start_unix_ns), max(hi, s.end_unix_ns))
    return [(hi - lo) / 1e3 for lo, hi in edges.values()]
