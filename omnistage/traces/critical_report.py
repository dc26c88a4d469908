"""The ``## Critical path`` section of summary.md: per request, what bounded its time to the
final stage's first output and its end-to-end time (:mod:`omnistage.traces.critical`); over
every request, each stage's and each kind's share (p50, p90); and the bottleneck, in one
sentence."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from omnistage.traces.critical import (
    COMPUTE,
    HANDOFF,
    KINDS,
    QUEUED,
    TRANSPORT,
    WAITING,
    bound_by,
    request_chains,
    shares,
    totals,
    upstream_of,
)
from omnistage.traces.spans import RequestSpan, short_ids
from omnistage.traces.units import ms, percentile
from omnistage.types import CriticalSegment, RequestCriticalPath, StageStepTime

MAX_ROWS = 50
"""Requests listed one by one, slowest first; report.json and ProfileReport hold them all."""
LABELS = {
    QUEUED: "queued",
    COMPUTE: "compute",
    WAITING: "waiting for upstream",
    HANDOFF: "hand-off",
    TRANSPORT: "transport",
}
RULE = (
    "Each request's time, from its start (its first stage's call, less that stage's "
    "hand-off) to the final stage's first output and to its end, cut into the segments that "
    "bounded it, walking back from the end: *queued* and *compute* are the stage's own times, "
    "*transport* the orchestrator's view of a call less the stage's own time, *hand-off* the "
    "edge between two stages (its processor), and *waiting for upstream* a streamed stage "
    "with nothing to do until the previous stage sent its next chunk. The segments of a "
    "request add up to its time exactly (docs/profiling.md, *Critical path*)."
)


STEPS_RULE = (
    "*Model steps*: the share of each stage's compute on the request's end-to-end path during "
    "which that stage's engine was inside one of its steps (vLLM's `execute_context_*`, the "
    "torch engine's `omnistage.step`); the rest is the stage's own code between steps. *Own "
    "share*: the request's share of those steps, each moment of a step shared equally among "
    "the requests in compute on the stage then. `–`: the stage's traces hold no step (it was "
    "not traced, or the session was timing-only). See docs/profiling.md, *Engine steps*."
)


def critical_section(
    paths: Sequence[RequestCriticalPath], spans: Sequence[RequestSpan]
) -> list[str]:
    """The section's lines, from the session's critical paths (with their step records,
    :mod:`omnistage.traces.steps`) and its request spans."""
    lines = ["## Critical path", ""]
    skipped = request_chains(spans)[1]
    left_out = (
        f" {skipped} requests that did not pass every stage while the session recorded "
        "are left out."
        if skipped
        else ""
    )
    if not paths:
        return [*lines, f"No request passed every stage while the session recorded.{left_out}", ""]
    lines += [RULE + left_out, ""]
    lines += [_bottleneck(paths, upstream_of(spans)), ""]
    lines += _request_table(paths)
    lines += _share_table(paths)
    lines += _steps_table(paths)
    return lines


def _requests(count: int) -> str:
    return "one request" if count == 1 else f"the {count} requests"


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def _bound(segments: Sequence[CriticalSegment]) -> str:
    stage, kind, share = bound_by(segments)
    return f"{stage} · {LABELS[kind]} ({_percent(share)})" if stage else "–"


def _split(segments: Sequence[CriticalSegment]) -> str:
    spent = totals(segments, by="kind")
    whole = sum(spent.values())
    parts = [
        f"{LABELS[kind]} {_percent(spent[('', kind)] / whole)}"
        for kind in KINDS
        if spent.get(("", kind))
    ]
    return " · ".join(parts) or "–"


def _request_table(paths: Sequence[RequestCriticalPath]) -> list[str]:
    ordered = sorted(paths, key=lambda p: (-p.total_s, p.request_id))
    short = short_ids(p.request_id for p in paths)
    lines = [
        "| request | first output | bound by | split | total | bound by | split | model steps |",
        "| --- | ---: | --- | --- | ---: | --- | --- | --- |",
    ]
    for p in ordered[:MAX_ROWS]:
        cells = [
            short[p.request_id],
            ms(p.time_to_first_output_s * 1e6),
            _bound(p.first_output),
            _split(p.first_output),
            ms(p.total_s * 1e6),
            _bound(p.end_to_end),
            _split(p.end_to_end),
            _model_steps(p),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if len(ordered) > MAX_ROWS:
        lines += ["", f"The {len(ordered) - MAX_ROWS} faster requests are in report.json."]
    return [*lines, ""]


def _model_steps(path: RequestCriticalPath) -> str:
    """Per stage with compute on the end-to-end path: its model steps' share of that
    compute, ``–`` where its traces hold no step; ``–`` alone where no stage's do."""
    if not path.steps:
        return "–"
    found = {s.stage: s for s in path.steps}
    computed = dict.fromkeys(s.stage for s in path.end_to_end if s.kind == COMPUTE)
    parts = []
    for stage in computed:
        record = found.get(stage)
        fraction = record.step_fraction if record else None
        parts.append(f"{stage} {_percent(fraction) if fraction is not None else '–'}")
    return " · ".join(parts)


def _steps_table(paths: Sequence[RequestCriticalPath]) -> list[str]:
    by_stage: dict[str, list[StageStepTime]] = {}
    for path in paths:
        for record in path.steps:
            if record.compute_ns:
                by_stage.setdefault(record.stage, []).append(record)
    if not by_stage:
        return [STEPS_RULE, ""]
    lines = [
        f"Engine steps in each traced stage's compute, over {_requests(len(paths))}:",
        "",
        "| stage | model steps p50 | model steps p90 | own share p50 | own share p90 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for stage, records in by_stage.items():
        cells = [stage]
        cells += _p50_p90(r.step_ns / r.compute_ns for r in records)
        cells += _p50_p90(r.step_share_ns / r.compute_ns for r in records)
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", STEPS_RULE, ""]


def _p50_p90(values: Iterable[float]) -> list[str]:
    kept = list(values)
    return [_percent(percentile(kept, q)) for q in (50, 90)]


def _share_table(paths: Sequence[RequestCriticalPath]) -> list[str]:
    lines = [
        f"Share of each request's time, over {_requests(len(paths))}:",
        "",
        "| share of | first output p50 | first output p90 | end to end p50 | end to end p90 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    stage_order = list(dict.fromkeys(s.stage for p in paths for s in p.end_to_end))
    rows: list[tuple[str, tuple[str, str]]] = [(f"stage {st}", (st, "")) for st in stage_order]
    rows += [(LABELS[kind], ("", kind)) for kind in KINDS]
    first = shares(paths, first=True, by="stage") | shares(paths, first=True, by="kind")
    end = shares(paths, first=False, by="stage") | shares(paths, first=False, by="kind")
    for label, key in rows:
        if key not in first and key not in end:
            continue
        cells = [label]
        for values in (first.get(key, []), end.get(key, [])):
            cells += [_percent(percentile(values, q)) if values else "–" for q in (50, 90)]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _clause(stage: str, kind: str, upstream: Mapping[str, str], share: str, of: str) -> str:
    if kind == WAITING:
        before = upstream.get(stage, "the previous stage")
        return f"{stage} waited for {before}'s chunks for {share} of {of}"
    if kind == QUEUED:
        return f"requests queued in {stage} for {share} of {of}"
    if kind == COMPUTE:
        return f"{stage} computed for {share} of {of}"
    if kind == HANDOFF:
        return f"the hand-off to {stage} (its edge's processor) took {share} of {of}"
    return f"transport to and from {stage} took {share} of {of}"


def _bottleneck(paths: Sequence[RequestCriticalPath], upstream: Mapping[str, str]) -> str:
    """One sentence: the (stage, kind) with the largest median share of the time to first
    output, and of the end-to-end time."""
    found: list[tuple[tuple[str, str], str, str]] = []
    for first, of in ((True, "the time to first output"), (False, "the end-to-end time")):
        medians = {k: percentile(v, 50) for k, v in shares(paths, first=first).items()}
        if medians:
            key, most = max(medians.items(), key=lambda item: (item[1], item[0]))
            found.append((key, _percent(most), of))
    if not found:
        return "No request took any time."
    if len(found) == 2 and found[0][0] == found[1][0]:  # one clause for both
        (stage, kind), share, of = found[0]
        clauses = [
            _clause(stage, kind, upstream, share, f"{of} and {found[1][1]} of {found[1][2]}")
        ]
    else:
        clauses = [_clause(stage, kind, upstream, share, of) for (stage, kind), share, of in found]
    many = f"medians over {_requests(len(paths))}" if len(paths) > 1 else "one request"
    return f"**Bottleneck:** {', and '.join(clauses)} ({many})."
