"""Two profile sessions side by side: what changed, stage by stage (``omnistage profile diff``).

Each session folder is read with the trace package's own readers (:func:`read_session` for
report.json and the spans, :func:`collect_stats` for each stage's op table and busy time), and
its figures are those of :mod:`omnistage.traces.figures`. Per stage that both sessions have:

* busy share (host, and device where there are device events) of the profiled window;
* latency p50 and p90 of the stage's request spans; the requests' end-to-end latency and
  their time to the final stage's first output too;
* the critical-path split: the stage's share of the requests' time to first output and of
  their end-to-end time, each segment kind's share of the end-to-end time, and the model
  steps' share of the stage's compute on the path (p50 over requests; see
  :mod:`omnistage.traces.figures`);
* the top ops by self time (self device time when either session has device time, else self
  CPU time), each **per engine step** when both sessions' traces count steps, else **per
  request** when both have request spans, else per session; the diff says which.

Every figure is a :class:`Change`: ``a``, ``b``, ``delta = b - a`` and ``pct = 100 * delta /
a`` (None where ``a`` is 0 or either side is missing; 0 when both are equal). Stages that
only one session has are listed by name, never compared. :meth:`SessionDiff.to_json` is the
``--json`` output; its schema is in docs/profiling.md ("Compare two sessions").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from omnistage.traces.critical import KINDS
from omnistage.traces.critical_report import LABELS
from omnistage.traces.figures import SessionFigures, StageFigures, session_figures
from omnistage.traces.report import read_session
from omnistage.traces.stats import collect_stats
from omnistage.traces.steps import attributed_paths
from omnistage.traces.units import ms as _time
from omnistage.traces.units import share as _share

SCHEMA = "omnistage.profile-diff/1"
DEFAULT_TOP = 10
_NAME_WIDTH = 48


@dataclass(frozen=True)
class Change:
    """One figure in both sessions and how it moved from A to B."""

    a: float | None
    b: float | None
    delta: float | None
    """``b - a``; None where either is missing."""
    pct: float | None
    """``100 * delta / a``; None where ``a`` is 0 (and ``b`` is not) or either is missing."""


def change(a: float | None, b: float | None) -> Change:
    if a is None or b is None:
        return Change(a, b, None, None)
    delta = b - a
    if delta == 0:
        return Change(a, b, 0.0, 0.0)
    return Change(a, b, delta, 100.0 * delta / a if a else None)


@dataclass(frozen=True)
class OpChange:
    """One op's self time and calls, each per unit (:attr:`StageDiff.ops_per`), in µs."""

    name: str
    self_cpu_us: Change
    self_device_us: Change
    calls: Change


@dataclass(frozen=True)
class StageDiff:
    """One stage that both sessions have."""

    stage: str
    busy_share: Change
    """Host busy time over the profiled window, 0 to 1 (None: no trace of the stage)."""
    device_busy_share: Change
    latency_p50_us: Change
    latency_p90_us: Change
    requests: Change
    ops_per: str
    """``"engine step"``, ``"request"`` or ``"session"``: what the op figures are divided by."""
    units: Change
    """How many of them each session has (engine steps or requests; 1 for a session)."""
    ops_ranked_by: str
    """``"self CPU"`` or ``"self device"``: the time the top ops are chosen by."""
    ops: tuple[OpChange, ...]
    """The top ops, by the larger of their two per-unit times; empty unless both sessions
    have a trace of the stage."""
    path_first_share: Change
    """p50 of the stage's share (0 to 1) of the requests' time to first output."""
    path_share: Change
    """The same, of the end-to-end time."""
    path_kinds: Mapping[str, Change]
    """Per segment kind (``queued``, ``compute``, ...): p50 of the stage's time of that kind
    as a share of the end-to-end time; kinds in either session."""
    model_steps: Change
    """p50 of the engine steps' share of the stage's compute on the path."""


@dataclass(frozen=True)
class SessionSide:
    """One of the two sessions."""

    path: str
    session_id: str
    requests: int
    window_us: float


@dataclass(frozen=True)
class SessionDiff:
    """What :func:`diff_sessions` found; :meth:`to_json` for scripts."""

    schema: str
    a: SessionSide
    b: SessionSide
    latency_p50_us: Change
    """End to end: a request's first span start to its last span end."""
    latency_p90_us: Change
    first_output_p50_us: Change
    """Time to the final stage's first output, from the critical paths."""
    first_output_p90_us: Change
    stages: tuple[StageDiff, ...]
    stages_only_in_a: tuple[str, ...]
    stages_only_in_b: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The diff as JSON data (lists, not tuples): the ``--json`` output's object."""
        data: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(self))
        return data


def diff_sessions(
    a: Path | str,
    b: Path | str,
    *,
    top: int = DEFAULT_TOP,
    progress: Callable[[str], None] | None = None,
) -> SessionDiff:
    """Compare session folder ``b`` with ``a`` (see the module's docstring).

    Raises:
        FileNotFoundError: a folder does not exist, or has no report.json (the message
            names it): not a session folder.
        ValueError: a report.json is malformed.
    """
    side_a, fig_a = _read(Path(a), progress)
    side_b, fig_b = _read(Path(b), progress)
    common = [s for s in fig_a.stages if s in fig_b.stages]
    return SessionDiff(
        schema=SCHEMA,
        a=side_a,
        b=side_b,
        latency_p50_us=change(fig_a.latency_p50_us, fig_b.latency_p50_us),
        latency_p90_us=change(fig_a.latency_p90_us, fig_b.latency_p90_us),
        first_output_p50_us=change(fig_a.first_output_p50_us, fig_b.first_output_p50_us),
        first_output_p90_us=change(fig_a.first_output_p90_us, fig_b.first_output_p90_us),
        stages=tuple(_stage(fig_a.stages[s], fig_b.stages[s], top) for s in common),
        stages_only_in_a=tuple(s for s in fig_a.stages if s not in fig_b.stages),
        stages_only_in_b=tuple(s for s in fig_b.stages if s not in fig_a.stages),
    )


def _read(
    folder: Path, progress: Callable[[str], None] | None
) -> tuple[SessionSide, SessionFigures]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such folder; give a session folder (<output_dir>/<session_id>/, "
            "holding report.json)"
        )
    record = read_session(folder)
    collected = collect_stats(folder, record.clocks, progress)
    listed = [e.get("stage") for e in record.report.get("stages", []) if isinstance(e, Mapping)]
    figures = session_figures(
        collected,
        record.spans,
        order=record.stage_order(),
        names=[s for s in listed if isinstance(s, str)],
        paths=attributed_paths(record.spans, {key: s.steps for key, s in collected.items()}),
    )
    side = SessionSide(
        path=str(folder),
        session_id=str(record.report.get("session_id") or folder.name),
        requests=figures.requests,
        window_us=figures.window_us,
    )
    return side, figures


def _stage(a: StageFigures, b: StageFigures, top: int) -> StageDiff:
    per, unit_a, unit_b = _unit(a, b)
    by_device = any(o.self_device_us > 0 for f in (a, b) for o in f.ops.values())
    ops: tuple[OpChange, ...] = ()
    if a.traced and b.traced:
        ops = _top_ops(a, b, unit_a, unit_b, top=top, by_device=by_device)
    return StageDiff(
        stage=a.stage,
        busy_share=change(a.busy_share, b.busy_share),
        device_busy_share=change(a.device_busy_share, b.device_busy_share),
        latency_p50_us=change(a.latency_p50_us, b.latency_p50_us),
        latency_p90_us=change(a.latency_p90_us, b.latency_p90_us),
        requests=change(a.requests, b.requests),
        ops_per=per,
        units=change(unit_a, unit_b),
        ops_ranked_by="self device" if by_device else "self CPU",
        ops=ops,
        path_first_share=change(a.path_first_share, b.path_first_share),
        path_share=change(a.path_share, b.path_share),
        path_kinds={
            kind: change(a.path_kinds.get(kind, 0.0), b.path_kinds.get(kind, 0.0))
            for kind in KINDS
            if kind in a.path_kinds or kind in b.path_kinds
        },
        model_steps=change(a.model_steps, b.model_steps),
    )


def _unit(a: StageFigures, b: StageFigures) -> tuple[str, float, float]:
    """What the op figures are divided by: engine steps if both count them, else requests."""
    if a.steps and b.steps:
        return "engine step", float(a.steps), float(b.steps)
    if a.requests and b.requests:
        return "request", float(a.requests), float(b.requests)
    return "session", 1.0, 1.0


def _top_ops(
    a: StageFigures, b: StageFigures, unit_a: float, unit_b: float, *, top: int, by_device: bool
) -> tuple[OpChange, ...]:
    def time(figures: StageFigures, name: str, unit: float) -> float:
        op = figures.ops.get(name)
        if op is None:
            return 0.0
        return (op.self_device_us if by_device else op.self_cpu_us) / unit

    def rank(name: str) -> tuple[float, str]:
        return (-max(time(a, name, unit_a), time(b, name, unit_b)), name)

    names = sorted({*a.ops, *b.ops}, key=rank)[: max(top, 0)]
    out = []
    for name in names:
        op_a, op_b = a.ops.get(name), b.ops.get(name)
        cells = []
        for attr in ("self_cpu_us", "self_device_us", "calls"):
            va = float(getattr(op_a, attr)) / unit_a if op_a else 0.0
            vb = float(getattr(op_b, attr)) / unit_b if op_b else 0.0
            cells.append(change(va, vb))
        out.append(OpChange(name, *cells))
    return tuple(out)


# -- the text table -----------------------------------------------------------------------------

Row = tuple[str, str, str, str, str]


def format_diff(diff: SessionDiff) -> str:
    """The diff as aligned text tables, for people (``omnistage profile diff``)."""
    lines = [
        "Session diff: delta = B - A, change = delta / A",
        f"  A: {diff.a.path} (session {diff.a.session_id}, {diff.a.requests} requests, "
        f"profiled window {_time(diff.a.window_us)})",
        f"  B: {diff.b.path} (session {diff.b.session_id}, {diff.b.requests} requests, "
        f"profiled window {_time(diff.b.window_us)})",
        "",
    ]
    rows: list[Row] = [
        _row("latency p50", diff.latency_p50_us, _time),
        _row("latency p90", diff.latency_p90_us, _time),
    ]
    if diff.first_output_p50_us.a is not None or diff.first_output_p50_us.b is not None:
        rows += [
            _row("first output p50", diff.first_output_p50_us, _time),
            _row("first output p90", diff.first_output_p90_us, _time),
        ]
    lines += _table("Requests, end to end", rows)
    for stage in diff.stages:
        lines += _stage_lines(stage)
    if not diff.stages:
        lines += ["No stage is in both sessions.", ""]
    for label, names in (("A", diff.stages_only_in_a), ("B", diff.stages_only_in_b)):
        if names:
            lines.append(f"Stages only in {label}: {', '.join(names)}")
    return "\n".join(lines).rstrip() + "\n"


def _stage_lines(stage: StageDiff) -> list[str]:
    rows: list[Row] = [_row("busy share (host)", stage.busy_share, _share)]
    if stage.device_busy_share.a is not None or stage.device_busy_share.b is not None:
        rows.append(_row("busy share (device)", stage.device_busy_share, _share))
    rows += [
        _row("latency p50", stage.latency_p50_us, _time),
        _row("latency p90", stage.latency_p90_us, _time),
        _row("requests", stage.requests, _count),
        *_path_rows(stage),
    ]
    lines = _table(f"Stage {stage.stage}", rows)
    if not stage.ops:
        return [*lines[:-1], "  (no op table: a session has no trace of this stage)", ""]
    units = stage.units
    per = stage.ops_per
    counted = f"{_count(units.a)} in A, {_count(units.b)} in B"
    title = f"  top {len(stage.ops)} ops by {stage.ops_ranked_by} time, per {per} ({counted})"
    if per == "session":
        title = f"  top {len(stage.ops)} ops by {stage.ops_ranked_by} time, per session"
    device = stage.ops_ranked_by == "self device"
    op_rows = [
        _row(_name(op.name), op.self_device_us if device else op.self_cpu_us, _time)
        for op in stage.ops
    ]
    return [*lines[:-1], title, *_table("op", op_rows, indent="    ", head_indent="    ")]


def _path_rows(stage: StageDiff) -> list[Row]:
    """The critical-path split's rows; none where neither session has critical paths."""
    if stage.path_share.a is None and stage.path_share.b is None:
        return []
    rows = [
        _row("critical path: first output p50", stage.path_first_share, _share),
        _row("critical path: end to end p50", stage.path_share, _share),
    ]
    rows += [_row(f"  {LABELS[k]}", c, _share) for k, c in stage.path_kinds.items()]
    if stage.model_steps.a is not None or stage.model_steps.b is not None:
        rows.append(_row("model steps in its compute p50", stage.model_steps, _share))
    return rows


def _row(label: str, c: Change, fmt: Callable[[float | None], str]) -> Row:
    if fmt is _share:
        delta = "–" if c.delta is None else f"{100 * c.delta:+.1f} pt"
    else:
        delta = "–" if c.delta is None else ("+" if c.delta >= 0 else "-") + fmt(abs(c.delta))
    pct = "–" if c.pct is None else f"{c.pct:+.1f}%"
    return (label, fmt(c.a), fmt(c.b), delta, pct)


def _table(title: str, rows: list[Row], *, indent: str = "  ", head_indent: str = "") -> list[str]:
    head: Row = (title, "A", "B", "delta", "change")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    widths[0] = max(len(title) + len(head_indent) - len(indent), *(len(r[0]) for r in rows), 0)

    def line(first: str, row: Row) -> str:
        cells = [first, *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
        return "  ".join(cells).rstrip()

    head_width = widths[0] + len(indent) - len(head_indent)
    out = [line(head_indent + title.ljust(head_width), head)]
    out += [line(indent + r[0].ljust(widths[0]), r) for r in rows]
    return [*out, ""]


def _count(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def _name(name: str) -> str:
    return name if len(name) <= _NAME_WIDTH else name[: _NAME_WIDTH - 1] + "…"
