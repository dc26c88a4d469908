"""Requests on the timeline: each one's passage through each stage, and its hand-offs.

The orchestrator records, per request and stage, a :class:`RequestSpan` on its own wall
clock. On the merged timeline they make the ``orchestrator`` process (sorted first):

* one thread per request and stage, named ``<request> · <stage>`` with the request id cut to
  its first 8 characters (more where two would read alike); streaming hand-offs make the
  spans of one request overlap, hence a thread each;
* on it the ``stage <name>`` slice, and its ``queued→first output`` child;
* per hand-off, a short ``handoff`` slice on the previous stage's thread that **ends** at the
  moment its output was handed on (the next span's start less ``handoff_s``), one on the next
  stage's thread that **starts** where that input arrived (the next span's start), and a flow
  arrow from the first to the second. Perfetto binds a JSON flow to the innermost slice
  around it, so the arrow sits inside those two slices and nowhere else: its delay in the UI
  is the hand-off itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from omnistage.traces.events import Event

ORCHESTRATOR_PID = 1
HANDOFF = "handoff"
FIRST_OUTPUT = "queued→first output"
MARK_US = 2.0
"""How long a ``handoff`` slice lasts on the timeline (it marks a moment)."""


@dataclass(frozen=True)
class ChunkSpan:
    """One chunk call of a streamed stage (``input.stream_chunk``), on the orchestrator's
    wall clock; the ``stage_*`` times are the stage's own, as it reported them."""

    ready_unix_ns: int
    """The chunk was cut: the previous stage's tokens for it had all arrived."""
    start_unix_ns: int
    """Its call started (the in-flight limit may have held it back after ``ready``)."""
    first_output_unix_ns: int
    end_unix_ns: int
    """Its last output arrived."""
    stage_time_s: float = 0.0
    """The stage's own time for the call, from its arrival to its last output."""
    stage_first_output_s: float = 0.0
    queue_time_s: float = 0.0


@dataclass(frozen=True)
class RequestSpan:
    """One request's passage through one stage, on the orchestrator's wall clock."""

    request_id: str
    stage: str
    stage_index: int
    replica: str
    start_unix_ns: int
    first_output_unix_ns: int
    end_unix_ns: int
    handoff_s: float
    queue_time_s: float
    trace_id: str = ""  # the request's OpenTelemetry trace, when the orchestrator traces
    stage_time_s: float = 0.0
    """The stage server's own time, from the request's arrival to its last output (summed
    over the chunk calls of a streamed stage); 0 where the stage did not report it."""
    stage_first_output_s: float = 0.0
    """The stage server's own time to its first output (its first chunk's, when streamed)."""
    chunks: tuple[ChunkSpan, ...] = ()
    """A streamed stage's chunk calls, in order; empty for a stage called once."""


SPAN_DEFAULTS: dict[str, Any] = {
    "stage_index": 0,
    "replica": "",
    "first_output_unix_ns": 0,
    "handoff_s": 0.0,
    "queue_time_s": 0.0,
    "trace_id": "",
    "stage_time_s": 0.0,
    "stage_first_output_s": 0.0,
    "chunks": (),
}
"""What a span written by an older omnistage may lack; the other fields are required."""


def span_from_mapping(data: Mapping[str, Any]) -> RequestSpan:
    """A :class:`RequestSpan` from its ``dataclasses.asdict`` form, as report.json holds it,
    checked against the dataclass itself (msgspec): a missing or mistyped field is named."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a request span is an object, not {type(data).__name__}")
    return msgspec.convert({**SPAN_DEFAULTS, **data}, RequestSpan, strict=False)


def short_ids(request_ids: Iterable[str], width: int = 8) -> dict[str, str]:
    """Each id cut to ``width`` characters, or longer where two cut ids would be the same."""
    ids = sorted(set(request_ids))
    out: dict[str, str] = {}
    for rid in ids:
        n = width
        while n < len(rid) and any(o != rid and o[:n] == rid[:n] for o in ids):
            n += 4
        out[rid] = rid if len(rid) <= n + 1 else rid[:n] + "…"
    return out


def orchestrator_events(spans: Sequence[RequestSpan], *, origin_ns: int) -> list[Event]:
    """The orchestrator's process: request threads, stage slices, hand-off slices and arrows."""
    pid = ORCHESTRATOR_PID
    events = [
        _meta("process_name", pid, 0, {"name": "orchestrator"}),
        _meta("process_sort_index", pid, 0, {"sort_index": -1}),
    ]
    by_request: dict[str, list[RequestSpan]] = {}
    for span in sorted(spans, key=lambda s: (s.start_unix_ns, s.stage_index)):
        by_request.setdefault(span.request_id, []).append(span)
    short = short_ids(by_request)
    tid = flow = 0
    for request_id, chain in by_request.items():
        chain.sort(key=lambda s: (s.stage_index, s.start_unix_ns))
        before: tuple[int, list[float]] | None = None  # previous thread, its slice edges
        for span in chain:
            tid += 1
            where = f" ({span.replica})" if span.replica else ""
            name = f"{short[request_id]} · {span.stage}{where}"
            events.append(_meta("thread_name", pid, tid, {"name": name}))
            events.append(_meta("thread_sort_index", pid, tid, {"sort_index": tid}))
            ts = _us(span.start_unix_ns - origin_ns)
            end = max(ts, _us(span.end_unix_ns - origin_ns))
            args = {
                "request_id": request_id,
                "stage": span.stage,
                "stage_index": span.stage_index,
                "replica": span.replica,
                "queue_time_s": span.queue_time_s,
                "handoff_s": span.handoff_s,
                "stage_time_s": span.stage_time_s,
                "chunks": len(span.chunks),
            }
            if span.trace_id:
                args["trace_id"] = span.trace_id
            events.append(_slice(f"stage {span.stage}", pid, tid, ts, end - ts, args))
            edges = [ts, end]
            if span.first_output_unix_ns >= span.start_unix_ns:
                first = min(_us(span.first_output_unix_ns - origin_ns), end)
                events.append(_slice(FIRST_OUTPUT, pid, tid, ts, first - ts, {}))
                edges.append(first)
            if before is not None:
                flow += 1
                prev_tid, prev_edges = before
                left = _us(span.start_unix_ns - round(span.handoff_s * 1e9) - origin_ns)
                info = {"request_id": request_id, "to": span.stage, "handoff_s": span.handoff_s}
                out_ts, out_dur = _mark(min(left, ts), prev_edges, ending=True)
                in_ts, in_dur = _mark(ts, edges, ending=False)
                events.append(_slice(HANDOFF, pid, prev_tid, out_ts, out_dur, info))
                events.append(_slice(HANDOFF, pid, tid, in_ts, in_dur, info))
                flow_id = (pid << 40) | flow
                events.append(_flow("s", flow_id, pid, prev_tid, round(out_ts + out_dur / 2, 3)))
                events.append(_flow("f", flow_id, pid, tid, round(in_ts + in_dur / 2, 3)))
                prev_edges.append(out_ts)
            before = (tid, edges)
    return events


def _mark(at: float, edges: Sequence[float], *, ending: bool) -> tuple[float, float]:
    """A short slice that ends (or starts) at ``at`` and crosses none of the thread's edges.

    Its length is :data:`MARK_US`, less where a slice edge is closer: the mark then lies in
    one gap between edges, so it nests in, or sits beside, every slice of its thread, as
    Perfetto requires. A moment within 10 ns of an edge is moved onto it.
    """
    sign = -1.0 if ending else 1.0
    near = [e for e in edges if abs(e - at) < 0.01]
    if near:
        at = near[0]
    ahead = [e for e in edges if (e - at) * sign > 0.0005]
    other = min(ahead, key=lambda e: abs(e - at), default=at + sign * MARK_US)
    length = round(min(MARK_US, abs(other - at)), 3)
    return (round(at - length, 3), length) if ending else (at, length)


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def _meta(kind: str, pid: int, tid: int, args: dict[str, Any]) -> Event:
    return Event(ph="M", name=kind, pid=pid, tid=tid, ts=0.0, args=args)


def _slice(name: str, pid: int, tid: int, ts: float, dur: float, args: dict[str, Any]) -> Event:
    return Event(
        ph="X", cat="request", name=name, pid=pid, tid=tid, ts=ts, dur=round(dur, 3), args=args
    )


def _flow(ph: str, flow_id: int, pid: int, tid: int, ts: float) -> Event:
    return Event(
        ph=ph,
        cat="request",
        name=HANDOFF,
        id=flow_id,
        pid=pid,
        tid=tid,
        ts=ts,
        bp="e" if ph == "f" else None,
    )
