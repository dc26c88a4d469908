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
  ``execute_context_*``, the torch engine's ``omnistage.step``), counted in the op table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from omnistage.traces.optable import OpStat
from omnistage.traces.spans import RequestSpan
from omnistage.traces.stats import StageTraceStats
from omnistage.traces.steps import STEP_PREFIXES


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


@dataclass(frozen=True)
class SessionFigures:
    """Every stage's figures, in pipeline order, and the requests' end-to-end latency."""

    window_us: float
    """The profiled window; 0 when no trace was read."""
    stages: Mapping[str, StageFigures]
    requests: int
    latency_p50_us: float | None
    latency_p90_us: float | None


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
) -> SessionFigures:
    """Per stage, what :mod:`omnistage.traces.figures` defines; ``order`` (stage → index, as
    the report lists them) and the spans' stage indices put the stages in pipeline order.
    ``names`` adds stages that have neither traces nor spans (a failed stage)."""
    window = window_of(collected)
    by_stage = _join_replicas(collected)
    spans_of: dict[str, list[RequestSpan]] = {}
    for span in spans:
        spans_of.setdefault(span.stage, []).append(span)
    stages = {*by_stage, *spans_of, *names}
    ranked = sorted(stages, key=lambda s: _rank(s, order or {}, spans_of))
    figures = {s: _stage(s, by_stage.get(s), spans_of.get(s, []), window) for s in ranked}
    ends = _end_to_end(spans)
    return SessionFigures(
        window_us=window,
        stages=figures,
        requests=len(ends),
        latency_p50_us=percentile(ends, 50),
        latency_p90_us=percentile(ends, 90),
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
