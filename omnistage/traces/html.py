"""``summary.html``: the summary as one self-contained page, written beside ``summary.md``.

One file, no script, nothing fetched (a Content-Security-Policy forbids it): inline CSS and
an inline SVG drawn here. It holds

* the **request waterfall**: one row per request (``g.request``), each on its own timeline
  from its first span's start; in it one lane per stage span, coloured by stage. The light
  part of a bar runs from the span's start to its first output, the solid part from the
  first output to the end (the stretch in which the stage streamed its output). A streamed
  stage (``input.stream_chunk``) also gets one outlined box per chunk call (``rect.chunk``)
  inside its bar, from the call's start to its last output, with a tooltip giving the
  chunk's index, its cut, start, first output and end, and the stage's own time for it. A
  thin line marks each hand-off, from the moment the output was handed on to the moment the
  next stage's input arrived. Every bar has a tooltip;
* the **per-stage breakdown** (busy share, latency p50/p90; :mod:`omnistage.traces.figures`);
* the **top-op tables** of each traced stage, by self CPU time (and self device time).

Every name from a trace or a span is escaped (:func:`html.escape`).
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omnistage.traces.figures import SessionFigures, StageFigures, session_figures
from omnistage.traces.optable import OpStat
from omnistage.traces.spans import ChunkSpan, RequestSpan, short_ids
from omnistage.traces.stats import StageTraceStats
from omnistage.traces.units import ms as _ms
from omnistage.traces.units import share as _pct

logger = logging.getLogger(__name__)

SUMMARY_HTML_NAME = "summary.html"
MAX_ROWS = 500
"""Requests drawn in the waterfall at most (the first ones, by start)."""
PALETTE = (
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
_LABEL_W, _PLOT_W, _AXIS_H, _LANE_H, _PAD, _RIGHT = 170, 860, 28, 14, 6, 90
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:17px;margin-top:28px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 16px}
th,td{border:1px solid #ccc;padding:3px 8px}td.num{text-align:right}
th{background:#f3f3f3}code{font-size:12px}.note{color:#666}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""


def write_html(
    session_dir: Path,
    *,
    report: Mapping[str, Any],
    spans: Sequence[RequestSpan],
    stages: Mapping[str, StageTraceStats],
    top: int = 15,
) -> Path:
    """Write ``session_dir/summary.html`` (see the module's docstring) and return its path."""
    session_dir = Path(session_dir)
    order: dict[str, int] = {}
    for entry in report.get("stages", []):
        if isinstance(entry, Mapping) and isinstance(entry.get("stage"), str):
            order.setdefault(entry["stage"], len(order))
    figures = session_figures(stages, spans, order=order)
    colours = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(figures.stages)}
    title = f"Profile session {report.get('session_id', session_dir.name)}"
    body = [f"<h1>{_e(title)}</h1>", *_overview(figures)]
    body += ["<h2>Requests</h2>", *_legend(colours), _waterfall(spans, colours)]
    body += ["<h2>Stages</h2>", *_stage_table(figures)]
    body += _ops_tables(figures, top)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path = session_dir / SUMMARY_HTML_NAME
    path.write_text(page, encoding="utf-8")
    logger.info("summary %s written", path)
    return path


def _overview(figures: SessionFigures) -> list[str]:
    items = [
        f"stages: {len(figures.stages)}",
        f"requests seen: {figures.requests}",
        f"request latency p50 {_ms(figures.latency_p50_us)}, "
        f"p90 {_ms(figures.latency_p90_us)} (end to end)",
    ]
    if figures.window_us > 0:
        items.append(f"profiled window: {_ms(figures.window_us)}")
    return ["<ul>", *(f"<li>{_e(i)}</li>" for i in items), "</ul>"]


def _legend(colours: Mapping[str, str]) -> list[str]:
    keys = "".join(
        f"<span><i style='background:{c}'></i>{_e(s)}</span>" for s, c in colours.items()
    )
    return [
        f"<p class='legend'>{keys}</p>",
        "<p class='note'>One row per request, each on its own timeline from its first span. "
        "Light: span start to first output; solid: first output to end (streaming); "
        "outlined boxes: a streamed stage's chunk calls; grey lines: hand-offs. "
        "Hover a bar or a chunk for its times.</p>",
    ]


def _waterfall(spans: Sequence[RequestSpan], colours: Mapping[str, str]) -> str:
    by_request: dict[str, list[RequestSpan]] = {}
    for span in sorted(spans, key=lambda s: (s.start_unix_ns, s.stage_index)):
        by_request.setdefault(span.request_id, []).append(span)
    if not by_request:
        return "<p>No request spans were recorded in this session.</p>"
    shown = list(by_request.items())[:MAX_ROWS]
    longest = max(max(s.end_unix_ns for s in c) - min(s.start_unix_ns for s in c) for _, c in shown)
    scale = _PLOT_W / max(longest, 1)  # px per ns
    short = short_ids(by_request)
    rows, y = [], _AXIS_H
    for row, (request_id, chain) in enumerate(shown):
        chain.sort(key=lambda s: (s.stage_index, s.start_unix_ns))
        label = (short[request_id], "#f6f6f6" if row % 2 else "#ffffff")
        rows.append(_request_row(request_id, label, chain, y, scale, colours))
        y += len(chain) * (_LANE_H + 2) + 2 * _PAD
    width = _LABEL_W + _PLOT_W + _RIGHT
    svg = [
        f"<svg class='waterfall' xmlns='http://www.w3.org/2000/svg' width='{width}' "
        f"height='{y}' viewBox='0 0 {width} {y}' role='img' "
        "aria-label='request waterfall'>",
        *_axis(longest, scale, y),
        *rows,
        "</svg>",
    ]
    more = len(by_request) - len(shown)
    if more > 0:
        svg.append(f"<p class='note'>The first {len(shown)} requests; {more} more not drawn.</p>")
    return "\n".join(svg)


def _axis(longest_ns: int, scale: float, height: int) -> list[str]:
    step = _nice_step(longest_ns / 5)
    out = []
    tick = 0
    while tick <= longest_ns:
        x = _LABEL_W + tick * scale
        out.append(
            f"<line x1='{x:.1f}' y1='{_AXIS_H - 6}' x2='{x:.1f}' y2='{height}' stroke='#eee'/>"
            f"<text x='{x:.1f}' y='{_AXIS_H - 10}' text-anchor='middle'>{_ms(tick / 1e3)}</text>"
        )
        tick += step
    return out


def _nice_step(raw_ns: float) -> int:
    """1, 2 or 5 times a power of ten, at least ``raw_ns``."""
    if raw_ns <= 1:
        return 1
    power = 10 ** math.floor(math.log10(raw_ns))
    return int(next(m * power for m in (1, 2, 5, 10) if m * power >= raw_ns))


def _request_row(
    request_id: str,
    label: tuple[str, str],
    chain: Sequence[RequestSpan],
    y: int,
    scale: float,
    colours: Mapping[str, str],
) -> str:
    """One request's ``g.request``: ``label`` is its short id and row colour."""
    origin = min(s.start_unix_ns for s in chain)
    height = len(chain) * (_LANE_H + 2) + 2 * _PAD
    out = [
        f"<g class='request' data-request='{_e(request_id)}'>",
        f"<rect x='0' y='{y}' width='{_LABEL_W + _PLOT_W + _RIGHT}' height='{height}' "
        f"fill='{label[1]}'/>",
        f"<text x='4' y='{y + _PAD + _LANE_H - 3}'><title>{_e(request_id)}</title>"
        f"{_e(label[0])}</text>",
    ]

    def x(ns: int) -> float:
        return _LABEL_W + (ns - origin) * scale

    previous: float | None = None
    for lane, span in enumerate(chain):
        top = y + _PAD + lane * (_LANE_H + 2)
        out.append(_bar(span, x, top, colours.get(span.stage, PALETTE[0]), origin))
        if previous is not None:
            handed = x(span.start_unix_ns - round(span.handoff_s * 1e9))
            out.append(
                f"<line class='handoff' x1='{handed:.1f}' y1='{previous:.1f}' "
                f"x2='{x(span.start_unix_ns):.1f}' y2='{top + _LANE_H / 2:.1f}' "
                "stroke='#777' stroke-width='1'/>"
            )
        previous = top + _LANE_H / 2
    out.append("</g>")
    return "\n".join(out)


def _bar(span: RequestSpan, x: Callable[[int], float], top: float, colour: str, origin: int) -> str:
    start, end = x(span.start_unix_ns), x(max(span.end_unix_ns, span.start_unix_ns))
    first_ns = span.first_output_unix_ns
    streamed = span.start_unix_ns <= first_ns <= span.end_unix_ns
    split = x(first_ns) if streamed else start
    tip = (
        f"{span.stage}{f' ({span.replica})' if span.replica else ''}: "
        f"{_ms((span.start_unix_ns - origin) / 1e3)} → {_ms((span.end_unix_ns - origin) / 1e3)}"
        f" ({_ms((span.end_unix_ns - span.start_unix_ns) / 1e3)})"
    )
    if streamed:
        tip += f"; first output after {_ms((first_ns - span.start_unix_ns) / 1e3)}"
    if span.queue_time_s:
        tip += f"; queued {_ms(span.queue_time_s * 1e6)}"
    if span.chunks:
        tip += f"; {len(span.chunks)} chunk calls"
    common = f"y='{top:.1f}' height='{_LANE_H}' fill='{colour}'"
    return (
        f"<g class='span' data-stage='{_e(span.stage)}'><title>{_e(tip)}</title>"
        f"<rect x='{start:.1f}' width='{max(end - start, 1):.1f}' {common} fill-opacity='0.35'/>"
        f"<rect class='streamed' x='{split:.1f}' width='{max(end - split, 0.5):.1f}' {common}/>"
        + "".join(_chunk(i, c, x, top, origin) for i, c in enumerate(span.chunks))
        + f"<text x='{end + 3:.1f}' y='{top + _LANE_H - 3:.1f}'>{_e(span.stage)}</text></g>"
    )


def _chunk(index: int, chunk: ChunkSpan, x: Callable[[int], float], top: float, origin: int) -> str:
    """One chunk call of a streamed stage: an outlined box inside its bar, with its times."""
    start, end = x(chunk.start_unix_ns), x(max(chunk.end_unix_ns, chunk.start_unix_ns))

    def at(ns: int) -> str:
        return _ms((ns - origin) / 1e3)

    tip = (
        f"chunk {index}: cut at {at(chunk.ready_unix_ns)}, call {at(chunk.start_unix_ns)} → "
        f"{at(chunk.end_unix_ns)} ({_ms((chunk.end_unix_ns - chunk.start_unix_ns) / 1e3)}), "
        f"first output at {at(chunk.first_output_unix_ns)}"
    )
    if chunk.stage_time_s:
        tip += f"; the stage's own time {_ms(chunk.stage_time_s * 1e6)}"
    return (
        f"<rect class='chunk' data-chunk='{index}' x='{start:.1f}' y='{top + 2:.1f}' "
        f"width='{max(end - start, 1):.1f}' height='{_LANE_H - 4}' fill='#fff' "
        f"fill-opacity='0.45' stroke='#222' stroke-width='0.8'><title>{_e(tip)}</title></rect>"
    )


def _stage_table(figures: SessionFigures) -> list[str]:
    if not figures.stages:
        return ["<p>No stage was profiled and no request span was recorded.</p>"]
    head = [
        "stage", "requests", "busy (host)", "share of window", "busy (device)",
        "share of window", "latency p50", "latency p90", "first output p50",
    ]  # fmt: skip
    out = ["<table class='stages'>", _tr(head, header=True)]
    for s in figures.stages.values():
        device = s.device_busy_share is not None
        cells = [
            s.stage,
            str(s.requests),
            _ms(s.busy_us) if s.traced else "–",
            _pct(s.busy_share),
            _ms(s.device_busy_us) if device else "–",
            _pct(s.device_busy_share),
            _ms(s.latency_p50_us),
            _ms(s.latency_p90_us),
            _ms(s.first_output_p50_us),
        ]
        out.append(_tr(cells))
    out.append("</table>")
    out.append(
        "<p class='note'>Busy: the time during which the stage ran at least one op (nested ops "
        "counted once); share: busy time over the profiled window. Latency: of the stage's "
        "request spans, from the orchestrator.</p>"
    )
    return out


def _ops_tables(figures: SessionFigures, top: int) -> list[str]:
    out: list[str] = []
    for s in figures.stages.values():
        if not s.traced:
            continue
        ops = sorted(s.ops.values(), key=lambda o: (-o.self_cpu_us, -o.self_device_us, o.name))
        out += [f"<h3>{_e(s.stage)}: top {top} ops by self CPU time</h3>"]
        out += [f"<p class='note'>From {_e(', '.join(s.files))}.</p>", *_op_table(s, ops, top)]
        if any(o.self_device_us > 0 for o in ops):
            ops.sort(key=lambda o: (-o.self_device_us, -o.self_cpu_us, o.name))
            out += [f"<h3>{_e(s.stage)}: top {top} ops by self device time</h3>"]
            out += _op_table(s, [o for o in ops if o.self_device_us > 0], top)
    return out


def _op_table(stage: StageFigures, ops: Sequence[OpStat], top: int) -> list[str]:
    cpu_total = math.fsum(o.self_cpu_us for o in ops)
    with_device = any(o.self_device_us > 0 for o in stage.ops.values())
    head = ["op", "calls", "self CPU", "self CPU %", "CPU total"]
    head += ["self device"] if with_device else []
    out = [f"<table class='ops' data-stage='{_e(stage.stage)}'>", _tr(head, header=True)]
    for o in ops[: max(top, 0)]:
        cells = [o.name, str(o.calls), _ms(o.self_cpu_us)]
        cells += [_pct(o.self_cpu_us / cpu_total if cpu_total else None), _ms(o.total_cpu_us)]
        cells += [_ms(o.self_device_us)] if with_device else []
        out.append(_tr(cells, code=True))
    return [*out, "</table>"]


def _tr(cells: Sequence[str], *, header: bool = False, code: bool = False) -> str:
    if header:
        return "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in cells) + "</tr>"
    first = f"<code>{_e(cells[0])}</code>" if code else _e(cells[0])
    rest = "".join(f"<td class='num'>{_e(c)}</td>" for c in cells[1:])
    return f"<tr><td>{first}</td>{rest}</tr>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
