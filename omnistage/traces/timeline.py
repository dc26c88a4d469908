"""The merged timeline of a profile session: every stage's traces and every request's path.

:func:`build_timeline` writes, into the session folder:

* ``timeline.json.gz``: one Trace Event Format object, for chrome://tracing, HTA and scripts;
* ``timeline.pftrace.gz``: the same tracks, names and flows in Perfetto's protobuf format
  (:mod:`omnistage.traces.perfetto`), which the Perfetto UI opens several times faster, with
  every flow bound to its exact slices.

Each stage (each replica of it) keeps its own processes, in pipeline order after the
``orchestrator`` process (:mod:`omnistage.traces.spans`). Every time is on the orchestrator's
wall clock, in µs since ``metadata.origin_unix_ns``: a host's clock offset (server minus
orchestrator, :mod:`omnistage.traces.clock`) is taken off its traces' times.

The origin is found before the traces are read in full: the earliest of the request spans
and of each trace's first chunk, less a millisecond. Each trace is then merged in one pass
(:func:`omnistage.traces.merge.merge_trace`), several at once in worker processes, each
writing its own compressed parts, joined at the end into one gzip stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omnistage.traces.clock import ClockEstimate, resolve_clock
from omnistage.traces.events import TraceError, is_trace_file, slim_copy_path
from omnistage.traces.merge import TraceJob, TraceResult, combine, merge_trace
from omnistage.traces.parallel import in_workers, run_all, total_bytes
from omnistage.traces.perfetto import ProtoEncoder
from omnistage.traces.perfetto_wire import root_descriptor
from omnistage.traces.reader import TraceReader
from omnistage.traces.spans import ORCHESTRATOR_PID, RequestSpan, orchestrator_events
from omnistage.traces.writer import DeflatePart, Part, assemble, dumps, events_json

logger = logging.getLogger(__name__)

TIMELINE_NAME = "timeline.json.gz"
PROTO_TIMELINE_NAME = "timeline.pftrace.gz"
FRONTEND_MARK = ".async_llm."
"""vLLM's front-end (AsyncLLM) trace: ``<host>_<pid>.async_llm.<ns>.pt.trace.json.gz``."""
_MARGIN_NS = 1

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TraceSource:
    """One trace file of a session: whose it is and where."""

    stage: str
    replica: str
    """The replica's folder name; empty when the stage's files are not split per replica."""
    path: Path

    @property
    def key(self) -> str:
        """``stage``, or ``stage/replica``: the key of the stage's clock estimate."""
        return f"{self.stage}/{self.replica}" if self.replica else self.stage

    @property
    def frontend(self) -> bool:
        return FRONTEND_MARK in self.path.name


@dataclass
class Timeline:
    """What :func:`build_timeline` wrote and found."""

    path: Path
    """The JSON timeline."""
    files: list[Path]
    """Every timeline file written: the JSON one first."""
    traces: list[tuple[TraceSource, TraceResult]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def find_traces(session_dir: Path, *, prefer_slim: bool = False) -> list[TraceSource]:
    """Every stage's trace files: ``<stage>/*.pt.trace.json[.gz]`` and ``<stage>/<replica>/…``.

    A slimmed copy stands in for its original when ``prefer_slim`` is set, or when the
    original is gone; otherwise slimmed copies are ignored. Hidden folders are skipped.
    """
    found: list[TraceSource] = []
    for stage_dir in _subdirs(Path(session_dir)):
        for folder, replica in [(stage_dir, ""), *((d, d.name) for d in _subdirs(stage_dir))]:
            names = {p.name: p for p in folder.iterdir() if is_trace_file(p)}
            for name, path in sorted(names.items()):
                slim = slim_copy_path(path)
                if path == slim:
                    original = [n for n in names if n != name and slim_copy_path(names[n]) == path]
                    if original:
                        continue
                elif prefer_slim and slim.name in names:
                    path = slim
                found.append(TraceSource(stage_dir.name, replica, path))
    return found


def build_timeline(
    session_dir: Path,
    *,
    spans: Sequence[RequestSpan],
    clocks: Mapping[str, ClockEstimate],
    progress: Progress | None = None,
    stage_indices: Mapping[str, int] | None = None,
    prefer_slim: bool = False,
    workers: int | None = None,
) -> Timeline:
    """Write the timeline files (see the module's docstring) and return what was merged.

    ``stage_indices`` orders stages that no span names; ``prefer_slim`` uses slimmed copies
    where they exist; ``workers`` caps the worker processes (default: one per core). A trace
    that cannot be read is named, with its problem, in the warnings, and left out; every
    other trace is merged all the same.
    """
    session_dir = Path(session_dir)
    say = progress or (lambda _msg: None)
    sources = find_traces(session_dir, prefer_slim=prefer_slim)
    indices = _stage_order(spans, stage_indices, sources)
    sources.sort(key=lambda s: (indices[s.stage], s.replica, s.frontend, s.path.name))
    resolved = {src.key: resolve_clock(clocks, src.stage, src.replica) for src in sources}
    offset_of = {key: est.offset_ns if est else 0 for key, (est, _) in resolved.items()}
    warnings = [
        f"no clock estimate for {key!r}: its offset is taken as 0"
        for key, (est, _) in resolved.items()
        if est is None
    ]
    origin = _origin(spans, sources, offset_of)
    jobs = _jobs(session_dir, sources, indices, origin=origin, offset_of=offset_of)
    results = _run(jobs, workers, say)
    warnings += _result_warnings(results)
    metadata = {
        "origin_unix_ns": origin,
        "time_base": "orchestrator wall clock; ts are µs since origin_unix_ns",
        "clock_offsets": {
            key: {"offset_ns": offset_of[key], "error_ns": est and est.error_ns, "clock": name}
            for key, (est, name) in resolved.items()
        },
        "stage_indices": indices,
        "traces": _merged(sources, results),
        "requests": len({s.request_id for s in spans}),
        "warnings": warnings,
    }
    say("joining the timeline's parts")
    own = orchestrator_events(spans, origin_ns=origin)
    files = _write(session_dir, own, results, metadata)
    total = sum(r.events for r in results) + len(own)
    logger.info("timeline %s: %d events from %d traces", files[0], total, len(results))
    return Timeline(files[0], files, list(zip(sources, results, strict=True)), warnings)


def _origin(
    spans: Sequence[RequestSpan], sources: Sequence[TraceSource], offset_of: Mapping[str, int]
) -> int:
    """The timeline's origin: the earliest span or trace start (less a margin), unix ns on
    the orchestrator's clock."""
    starts = [s.start_unix_ns for s in spans]
    for src in sources:
        first = _first_ns(src.path)
        if first is not None:
            starts.append(first - offset_of[src.key] - _MARGIN_NS)
    return min(starts, default=0)


def _jobs(
    session_dir: Path,
    sources: Sequence[TraceSource],
    indices: Mapping[str, int],
    *,
    origin: int,
    offset_of: Mapping[str, int],
) -> list[TraceJob]:
    """One merge job per trace, numbered in timeline order; a trace is labelled with its
    rank where its stage (or front end) has several."""
    kinds: dict[tuple[str, bool], int] = {}
    for src in sources:
        kinds[(src.key, src.frontend)] = kinds.get((src.key, src.frontend), 0) + 1
    jobs = []
    for number, src in enumerate(sources):
        rel = src.path.relative_to(session_dir).as_posix()
        jobs.append(
            TraceJob(
                number=number,
                path=src.path,
                rel=rel,
                label=src.key + (" front end" if src.frontend else ""),
                sort_index=indices[src.stage],
                host_origin_ns=origin + offset_of[src.key],
                offset_ns=offset_of[src.key],
                json_part=session_dir / f".timeline.{number}.json.part",
                proto_part=session_dir / f".timeline.{number}.pb.part",
                rank_label=kinds[(src.key, src.frontend)] > 1,
            )
        )
    return jobs


def _merged(sources: Sequence[TraceSource], results: Sequence[TraceResult]) -> list[Any]:
    """The metadata's entry for each trace that was merged."""
    return [
        {
            "stage": s.stage,
            "replica": s.replica,
            "file": r.rel,
            "pids": r.pids,
            "events": r.events,
        }
        for s, r in zip(sources, results, strict=True)
        if not r.error
    ]


def _result_warnings(results: Sequence[TraceResult]) -> list[str]:
    """Each trace's own warnings, then why it was skipped and its unbound flows."""
    warnings = []
    for result in results:
        warnings.extend(result.warnings)
        if result.error:
            warnings.append(f"{result.rel} skipped: {result.error}")
        if result.unbound_flows:
            warnings.append(
                f"{result.rel}: {result.unbound_flows:,} flow events were bound to no slice "
                "starting where they are; the protobuf timeline leaves them out"
            )
    return warnings


def _write(
    session_dir: Path, own: list[Any], results: Sequence[TraceResult], metadata: dict[str, Any]
) -> list[Path]:
    head = DeflatePart(session_dir / ".timeline.head.part")
    head.write(b'{"traceEvents":[' + events_json(own))  # never empty: see merge_trace
    parts: list[Part] = [head.close()]
    parts += [r.json_part for r in results if r.json_part is not None]
    tail = DeflatePart(session_dir / ".timeline.tail.part")
    tail.write(b'],"displayTimeUnit":"ms","metadata":' + dumps(metadata) + b"}")
    parts.append(tail.close())
    json_path = assemble(session_dir / TIMELINE_NAME, parts)

    encoder = ProtoEncoder(1, annotate=True, bind_inside=True)
    packets = encoder.encode(own) + encoder.finish()
    encoder.process_ranks[ORCHESTRATOR_PID] = -1
    start = DeflatePart(session_dir / ".pftrace.head.part")
    start.write(root_descriptor(f"pipeline: {session_dir.name}") + encoder.descriptors())
    for result in results:
        start.write(result.descriptors)
    start.write(packets)
    proto_parts = [start.close(), *(r.proto_part for r in results if r.proto_part is not None)]
    proto_path = assemble(session_dir / PROTO_TIMELINE_NAME, proto_parts)
    return [json_path, proto_path]


def _run(jobs: list[TraceJob], workers: int | None, say: Progress) -> list[TraceResult]:
    """Merge every trace (:mod:`omnistage.traces.parallel`: in workers when big).

    In workers, each trace is two jobs: its timeline parts, and its op table with its busy
    time. Each reads the trace, but the largest trace's work then spreads over two cores
    instead of holding one while the others wait.
    """
    paths = [j.path for j in jobs]
    say(f"merging {len(jobs)} traces ({total_bytes(paths) / 1e6:.0f} MB)")
    split = in_workers(paths, workers)
    halves = (
        [replace(j, role=role) for j in jobs for role in ("timeline", "stats")] if split else jobs
    )

    def done(job: TraceJob, result: TraceResult) -> None:
        if job.role != "stats":
            say(f"stage {job.label}: {result.events:,} events")

    results = run_all(merge_trace, halves, [j.path for j in halves], workers=workers, done=done)
    if not split:
        return results
    return [combine(a, b) for a, b in zip(results[::2], results[1::2], strict=True)]


def _first_ns(path: Path) -> int | None:
    """The earliest event of a trace's first chunk, unix ns on its host's clock (metadata
    events count only where their ts is set)."""
    try:
        with TraceReader(path, chunk_bytes=1 << 20, raw_args=True) as reader:
            base = reader.base_ns or 0
            for chunk in reader.chunks():
                stamps = [ev.ts for ev in chunk if ev.ts is not None and (ev.ph != "M" or ev.ts)]
                if stamps:
                    return base + int(min(stamps) * 1000)
    except (TraceError, OSError) as exc:
        logger.debug("no start for %s: %s", path, exc)
    return None


def _stage_order(
    spans: Sequence[RequestSpan],
    given: Mapping[str, int] | None,
    sources: Sequence[TraceSource],
) -> dict[str, int]:
    order = dict(given or {})
    order.update({s.stage: s.stage_index for s in spans})
    for src in sources:
        if src.stage not in order:
            order[src.stage] = max(order.values(), default=-1) + 1
    return order


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
