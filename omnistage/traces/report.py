"""Rebuild a profile session's merged timeline and summary from its folder.

A session folder (``<output_dir>/<session_id>/``, as ``StopProfile`` leaves it) holds
``report.json`` and each stage's files. ``report.json`` may carry two optional keys besides
:class:`omnistage.types.ProfileReport`'s fields:

* ``"clocks"``: ``{"<stage>" or "<stage>/<replica>": {"offset_ns", "error_ns", "rtt_ns",
  "samples"}}``, the :class:`~omnistage.traces.clock.ClockEstimate` of each stage's host;
* ``"spans"``: ``[asdict(RequestSpan), ...]``, each request's passage through each stage.

:func:`rebuild_report` works from that alone, so it runs after the fact too
(``omnistage profile report DIR``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from omnistage.traces.clock import ClockEstimate, clock_from_mapping
from omnistage.traces.events import TraceError, slim_copy_path
from omnistage.traces.html import SUMMARY_HTML_NAME
from omnistage.traces.parallel import run_all
from omnistage.traces.slimming import SlimOptions, SlimStats, slim_trace_file
from omnistage.traces.spans import RequestSpan, span_from_mapping
from omnistage.traces.stats import stats_from_timeline
from omnistage.traces.steps import attributed_paths
from omnistage.traces.summary import write_summary
from omnistage.traces.timeline import build_timeline, find_traces
from omnistage.types import ProfileReport, ProfileSlimming, RequestCriticalPath

logger = logging.getLogger(__name__)

REPORT_NAME = "report.json"


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`rebuild_report` wrote."""

    timeline: Path
    """The JSON timeline."""
    summary: Path
    slim_stats: Mapping[str, SlimStats] = field(default_factory=dict)
    """Per trace (path relative to the session folder): what slimming saved. Empty when the
    traces were not slimmed."""

    slimmed: bool = False
    """Whether slimming was asked for (``slim_stats`` may be empty all the same)."""
    timelines: tuple[Path, ...] = ()
    """Every timeline file written: the JSON one, then Perfetto's protobuf one."""
    warnings: tuple[str, ...] = ()
    """Traces that could not be read (each names its file and the problem), and the like."""
    critical_paths: tuple[RequestCriticalPath, ...] = ()
    """Each complete request's critical path, with its compute split into engine steps and
    the rest where the stage's traces hold steps (:mod:`omnistage.traces.steps`)."""

    @property
    def summary_html(self) -> Path:
        """``summary.html``, written beside ``summary.md``: the same summary as one offline
        page, with a request waterfall (:mod:`omnistage.traces.html`)."""
        return self.summary.with_name(SUMMARY_HTML_NAME)

    @property
    def slim_total(self) -> SlimStats:
        return SlimStats.total(self.slim_stats.values())

    def slimming(self) -> ProfileSlimming | None:
        """What slimming saved over every trace, as the API reports it; None if not asked."""
        if not self.slimmed:
            return None
        total = self.slim_total
        return ProfileSlimming(
            bytes_before=total.bytes_before,
            bytes_after=total.bytes_after,
            events_before=total.events_before,
            events_after=total.events_after,
            traces=len(self.slim_stats),
            copies_written=sum(1 for s in self.slim_stats.values() if s.written),
        )


@dataclass(frozen=True)
class SessionRecord:
    """``report.json``, read: the report itself, the request spans and the clock estimates."""

    report: Mapping[str, Any]
    spans: tuple[RequestSpan, ...]
    clocks: Mapping[str, ClockEstimate]

    def stage_order(self) -> dict[str, int]:
        """Stage indices in the order the report lists the stages."""
        order: dict[str, int] = {}
        for entry in self.report.get("stages", []):
            if isinstance(entry, Mapping) and isinstance(entry.get("stage"), str):
                order.setdefault(entry["stage"], len(order))
        return order


def write_session(
    session_dir: Path,
    report: ProfileReport,
    *,
    spans: Sequence[RequestSpan],
    clocks: Mapping[str, ClockEstimate],
) -> Path:
    """Write ``session_dir/report.json``: the report, the request spans and the clock
    estimates, each encoded from its own dataclass (msgspec), as :func:`read_session` reads
    them back."""
    record = msgspec.to_builtins(report) | {
        "clocks": msgspec.to_builtins(dict(clocks)),
        "spans": msgspec.to_builtins(list(spans)),
    }
    path = Path(session_dir) / REPORT_NAME
    path.write_bytes(msgspec.json.format(msgspec.json.encode(record), indent=2))
    return path


def read_session(session_dir: Path) -> SessionRecord:
    """Read and check ``session_dir/report.json``.

    Raises:
        FileNotFoundError: there is no report.json: not a session folder.
        ValueError: report.json is not valid JSON, or a span or clock entry is malformed.
    """
    path = Path(session_dir) / REPORT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: give a session folder (<output_dir>/<session_id>/ as "
            "StopProfile writes it)"
        )
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(report, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(report).__name__}")
    spans = []
    for i, item in enumerate(report.get("spans") or []):
        try:
            spans.append(span_from_mapping(item))
        except (TypeError, msgspec.ValidationError) as exc:
            raise ValueError(f"{path}: spans[{i}] is malformed: {exc}") from exc
    clocks = {}
    for key, item in (report.get("clocks") or {}).items():
        try:
            clocks[str(key)] = clock_from_mapping(item)
        except (TypeError, msgspec.ValidationError) as exc:
            raise ValueError(f"{path}: clocks[{key!r}] is malformed: {exc}") from exc
    return SessionRecord(report, tuple(spans), clocks)


def rebuild_report(
    session_dir: Path,
    *,
    slim: SlimOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> ReportFiles:
    """Write ``timeline.json.gz``, ``summary.md`` and ``summary.html`` into ``session_dir``
    from its report.json and traces.

    With ``slim``, every trace first gets a slimmed copy beside it
    (``x.slim.pt.trace.json.gz``, see :mod:`omnistage.traces.slimming`; an existing copy is
    rewritten, and none is kept where it would not be smaller) and the timeline is built from
    the copies. The originals are never modified.
    Each trace is read once for the timeline and the summary together (the engine steps of
    the critical paths' split included).

    Raises:
        FileNotFoundError: no report.json in ``session_dir``.
        ValueError: report.json is malformed.
    """
    session_dir = Path(session_dir)
    record = read_session(session_dir)
    say = progress or (lambda _msg: None)
    slimmed = _slim_all(session_dir, slim, say) if slim is not None else {}
    timeline = build_timeline(
        session_dir,
        spans=record.spans,
        clocks=record.clocks,
        progress=progress,
        stage_indices=record.stage_order(),
        prefer_slim=slim is not None,
    )
    collected = stats_from_timeline(timeline.traces)
    paths = attributed_paths(record.spans, {key: s.steps for key, s in collected.items()})
    _record_paths(session_dir, record.report, paths)
    summary = write_summary(
        session_dir,
        report=record.report,
        spans=record.spans,
        clocks=record.clocks,
        collected=collected,
        slim_stats=slimmed if slim is not None else None,
        warnings=timeline.warnings,
        paths=paths,
    )
    return ReportFiles(
        timeline=timeline.path,
        summary=summary,
        timelines=tuple(timeline.files),
        warnings=tuple(timeline.warnings),
        slim_stats=slimmed,
        slimmed=slim is not None,
        critical_paths=paths,
    )


def _record_paths(
    session_dir: Path, report: Mapping[str, Any], paths: Sequence[RequestCriticalPath]
) -> None:
    """Put the critical paths, with their engine-step split, into report.json (the stop
    wrote them before the traces were read); every other key is kept as it was."""
    found = msgspec.json.decode(msgspec.json.encode(list(paths)))  # lists, as JSON reads
    if report.get("critical_paths") == found:
        return
    record = {**report, "critical_paths": found}
    path = session_dir / REPORT_NAME
    partial = path.with_name(f".{REPORT_NAME}.partial")  # a crash leaves the old one whole
    partial.write_bytes(msgspec.json.format(msgspec.json.encode(record), indent=2))
    partial.replace(path)


def _slim_all(
    session_dir: Path, slim: SlimOptions, say: Callable[[str], None]
) -> dict[str, SlimStats]:
    """Slim every trace of the session (in workers): per trace slimmed, what it saved."""
    sources = [s for s in find_traces(session_dir) if slim_copy_path(s.path) != s.path]
    jobs = [(s.path, s.path.relative_to(session_dir).as_posix(), slim) for s in sources]
    say(f"slimming {len(jobs)} traces")

    def done(job: tuple[Path, str, SlimOptions], result: SlimStats | str) -> None:
        say(f"slimmed {job[1]}")

    results = run_all(_slim_one, jobs, [s.path for s in sources], done=done)
    return {
        rel: result
        for (_, rel, _), result in zip(jobs, results, strict=True)
        if isinstance(result, SlimStats)
    }


def _slim_one(job: tuple[Path, str, SlimOptions]) -> SlimStats | str:
    """Slim one trace (a worker's job): its stats, or why it could not be slimmed."""
    path, rel, options = job
    try:
        return slim_trace_file(path, slim_copy_path(path), options, only_if_smaller=True)
    except (OSError, TraceError) as exc:
        logger.warning("could not slim %s: %s; the timeline uses the original", rel, exc)
        slim_copy_path(path).unlink(missing_ok=True)
        return str(exc)
