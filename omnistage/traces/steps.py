"""Engine steps in a request's compute: how much of each stage's compute on a request's
critical path was the engine's model steps, and how much the rest.

**Engine steps** are the host annotations that mark one step each: vLLM's
``execute_context_<n>(<tokens>)_generation_<m>(<tokens>)`` (its model runner's
``record_function`` around each ``execute_model``) and the torch engine's
``omnistage.step batch=<n>`` (:data:`STEP_PREFIXES`). The op table's pass over each trace
(:mod:`omnistage.traces.merge`) keeps their intervals, shifted onto the orchestrator's clock
by the stage's clock offset as every other event of the trace is, so no trace is read again.

**The rule.** For each request and each stage whose traces hold steps, take the ``compute``
segments of that stage on the request's end-to-end critical path
(:mod:`omnistage.traces.critical`; the stage's own time less its queue, on the
orchestrator's clock). A replica's steps count only for the requests that replica served.

* ``step_ns``: the part of those segments during which the stage's engine was inside a step.
  ``compute_ns - step_ns`` is the rest: the stage's own code between steps (scheduling,
  pre- and post-processing, detokenising, the stage server's Python), or an engine idle while
  the request sat in it.
* ``step_share_ns``: the request's **share** of those steps. Each moment of a step is shared
  equally among the requests whose compute segments on that stage cover that moment, so a step
  that two requests' compute overlaps entirely goes half to each, and one that a single
  request's compute covers for half its length gives it that half. Step time covered by no
  request's compute segment is attributed to nobody. The shares of all requests add up to the
  step time that lay inside some compute segment; a request's share is at most its
  ``step_ns``.

The traces name no request in a step (vLLM's annotation counts the batch's requests and
tokens, not which ones), so the share is by overlap in time, not by tokens. A stage that was
not traced, or whose traces hold no step annotation, gets no record: the summary shows ``-``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from omnistage.traces.clock import replica_folder
from omnistage.traces.critical import COMPUTE, critical_path, request_chains
from omnistage.traces.spans import RequestSpan
from omnistage.types import RequestCriticalPath, StageStepTime

STEP_PREFIXES = ("execute_context_", "omnistage.step")
"""Op names that mark one engine step each (as ``bench/profile_costs.py`` counts them)."""

Intervals = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]
"""Starts and ends, sorted and disjoint, in orchestrator-clock unix µs."""

_Segment = tuple[int, int, int]  # start ns, end ns, index of the request's path


def step_key(stage: str, replica: str, keys: Mapping[str, object]) -> str:
    """The stats key of a request's replica: ``stage/<replica folder>`` where the stage's
    files are split per replica, else ``stage``."""
    per_replica = f"{stage}/{replica_folder(replica)}" if replica else ""
    return per_replica if per_replica in keys else stage


def with_steps(
    paths: Sequence[RequestCriticalPath],
    chains: Mapping[str, Sequence[RequestSpan]],
    steps: Mapping[str, Intervals],
) -> list[RequestCriticalPath]:
    """``paths`` with their :class:`~omnistage.types.StageStepTime` records (see the
    module's rule). ``chains`` gives each request's spans (for the replica that served it),
    ``steps`` each stats key's step intervals; keys without steps are left out."""
    segments: dict[str, list[_Segment]] = {}
    for index, path in enumerate(paths):
        replicas = {s.stage: s.replica for s in chains.get(path.request_id, ())}
        for seg in path.end_to_end:
            if seg.kind != COMPUTE:
                continue
            key = step_key(seg.stage, replicas.get(seg.stage, ""), steps)
            if key in steps and steps[key][0].size:
                segments.setdefault(key, []).append((seg.start_unix_ns, seg.end_unix_ns, index))
    found: list[dict[str, list[int]]] = [{} for _ in paths]
    for key, items in segments.items():
        for (start, end, index), covered, share in zip(
            items, *_attribute(items, steps[key]), strict=True
        ):
            stage = key.partition("/")[0]
            sums = found[index].setdefault(stage, [0, 0, 0])
            sums[0] += end - start
            sums[1] += covered
            sums[2] += share
    out = []
    for path, per_stage in zip(paths, found, strict=True):
        order = list(dict.fromkeys(s.stage for s in path.end_to_end))
        records = tuple(
            StageStepTime(stage, *per_stage[stage]) for stage in order if stage in per_stage
        )
        out.append(replace(path, steps=records))
    return out


def _attribute(segments: Sequence[_Segment], steps: Intervals) -> tuple[list[int], list[int]]:
    """Per segment: the ns of it inside a step, and its share of the steps (the rule).

    Every segment and step boundary cuts the time into pieces; in each piece, the number of
    segments open and whether a step runs are constant, so prefix sums over the pieces give
    each segment's two figures exactly (to the ns the boundaries are rounded to)."""
    starts = np.array([s[0] for s in segments], dtype=np.int64)
    ends = np.array([s[1] for s in segments], dtype=np.int64)
    step_starts = np.rint(steps[0] * 1e3).astype(np.int64)
    step_ends = np.rint(steps[1] * 1e3).astype(np.int64)
    cuts = np.unique(np.concatenate([starts, ends, step_starts, step_ends]))
    lengths = np.diff(cuts).astype(np.float64)
    left = cuts[:-1]
    # pieces inside a step: the last step starting at or before the piece ends after it
    last = np.searchsorted(step_starts, left, side="right") - 1
    stepping = (last >= 0) & (step_ends[np.maximum(last, 0)] > left)
    opened = np.searchsorted(np.sort(starts), left, side="right")
    closed = np.searchsorted(np.sort(ends), left, side="right")
    open_now = opened - closed
    inside = np.where(stepping, lengths, 0.0)
    shared = np.where(stepping & (open_now > 0), lengths / np.maximum(open_now, 1), 0.0)
    covered_sum = np.concatenate([[0.0], np.cumsum(inside)])
    share_sum = np.concatenate([[0.0], np.cumsum(shared)])
    a, b = np.searchsorted(cuts, starts), np.searchsorted(cuts, ends)
    covered = np.rint(covered_sum[b] - covered_sum[a]).astype(np.int64).tolist()
    share = np.rint(share_sum[b] - share_sum[a]).astype(np.int64).tolist()
    return covered, share


def attributed_paths(
    spans: Sequence[RequestSpan], steps: Mapping[str, Intervals]
) -> tuple[RequestCriticalPath, ...]:
    """Every complete request's critical path with its step records (``steps``: each stats
    key's step intervals), in the order the requests started."""
    chains, _ = request_chains(spans)
    paths = sorted(
        (critical_path(chain) for chain in chains.values()),
        key=lambda p: (p.start_unix_ns, p.request_id),
    )
    return tuple(with_steps(paths, chains, steps))
