"""What each stage's traces hold, for the summary: op tables and busy time, per stage key.

:func:`stats_from_timeline` takes them from the timeline's merge (no trace is read again);
:func:`collect_stats` reads the traces for them when there is no timeline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from omnistage.traces.clock import ClockEstimate, resolve_clock
from omnistage.traces.events import TraceError
from omnistage.traces.merge import TraceResult, read_stats
from omnistage.traces.nesting import union
from omnistage.traces.optable import OpStat, merge_stats
from omnistage.traces.timeline import TraceSource, find_traces

logger = logging.getLogger(__name__)

Intervals = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]
_EMPTY: Intervals = (np.zeros(0), np.zeros(0))


@dataclass
class StageTraceStats:
    """What one stage's (one replica's) traces hold; times are orchestrator-clock unix µs."""

    key: str
    files: list[str] = field(default_factory=list)
    ops: dict[str, OpStat] = field(default_factory=dict)
    host_busy: Intervals = _EMPTY
    device_busy: Intervals = _EMPTY
    steps: Intervals = _EMPTY
    """The engine steps' intervals (:mod:`omnistage.traces.steps`)."""
    first_us: float = math.inf
    last_us: float = -math.inf
    problems: list[str] = field(default_factory=list)

    def add(
        self,
        file: str,
        ops: Sequence[OpStat],
        host: Intervals | None,
        device: Intervals | None,
        first_us: float,
        last_us: float,
        steps: Intervals | None = None,
    ) -> None:
        self.files.append(file)
        self.steps = _join(self.steps, steps)
        self.ops = merge_stats([list(self.ops.values()), ops])
        self.host_busy = _join(self.host_busy, host)
        self.device_busy = _join(self.device_busy, device)
        self.first_us = min(self.first_us, first_us)
        self.last_us = max(self.last_us, last_us)


def _join(a: Intervals, b: Intervals | None) -> Intervals:
    if b is None or b[0].size == 0:
        return a
    return union(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))


def stats_from_timeline(
    traces: Iterable[tuple[TraceSource, TraceResult]],
) -> dict[str, StageTraceStats]:
    """Per stage key, what the timeline's merge found in its traces (no trace is read again)."""
    stages: dict[str, StageTraceStats] = {}
    for source, result in traces:
        stats = stages.setdefault(source.key, StageTraceStats(source.key))
        if result.error:
            stats.problems.append(result.error)
            continue
        stats.add(
            source.path.name,
            result.ops,
            result.host_busy,
            result.device_busy,
            result.first_us,
            result.last_us,
            result.steps,
        )
    return stages


def collect_stats(
    session_dir: Path,
    clocks: Mapping[str, ClockEstimate],
    progress: Callable[[str], None] | None = None,
) -> dict[str, StageTraceStats]:
    """Read every trace of the session for its op table and busy time (slimmed copies where
    they exist: same op tables), as the timeline's merge would have."""
    traces: list[tuple[TraceSource, TraceResult]] = []
    for source in find_traces(session_dir, prefer_slim=True):
        estimate, _ = resolve_clock(clocks, source.stage, source.replica)
        result = TraceResult(len(traces), source.path.name, source.key)
        try:
            read_stats(source.path, source.path.name, estimate.offset_ns if estimate else 0, result)
        except (OSError, TraceError) as exc:
            logger.warning("summary: %s skipped: %s", source.path, exc)
            result.error = str(exc)
        else:
            if progress is not None:
                progress(f"stage {source.key}: read {source.path.name}")
        traces.append((source, result))
    return stats_from_timeline(traces)
