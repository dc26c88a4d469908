"""One merged timeline of a profile session: every stage's traces and every request's path.

:func:`build_timeline` writes ``<session>/timeline.json.gz``, one Trace Event Format object
that Perfetto (ui.perfetto.dev) and ``chrome://tracing`` open:

* each stage (each replica of it) keeps its own process tracks. Every trace file's pids get
  new, unique pids; tids are kept. A file's main process is named after the stage
  (``thinker``, ``thinker/<replica>``, ``thinker front end`` for vLLM's front-end trace) and
  sorted by the stage's index;
* an ``orchestrator`` process (sorted first) holds one thread per request and stage: a
  ``stage <name>`` span, the ``queued→first output`` part nested in it, and flow arrows from
  each stage's span to the next stage's span of the same request (streaming hand-offs make
  those spans overlap, hence a thread each);
* every time is on the orchestrator's wall clock, in µs since ``metadata.origin_unix_ns``
  (the earliest event). A torch trace's ``ts`` are µs since its ``baseTimeNanoseconds``, on
  its host's clock; with that host's offset (server minus orchestrator, see
  :mod:`orchestrator.clock`) an event lands at
  ``(baseTimeNanoseconds - offset_ns - origin_unix_ns) / 1000 + ts``.

Traces are loaded one file at a time: only one stage's events are in memory at once. The
origin is found first by a quick text scan of each file's ``ts`` values.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.clock import ClockEstimate, resolve_clock
from orchestrator.slimming import (
    FLOW_PHASES,
    TRACE_SUFFIXES,
    TraceWriter,
    drop_incomplete_flows,
    flow_key,
    slim_copy_path,
    strip_trace_suffix,
)
from services.profiling.optable import load_trace

logger = logging.getLogger(__name__)

TIMELINE_NAME = "timeline.json.gz"
FRONTEND_MARK = ".async_llm."
"""vLLM's front-end (AsyncLLM) trace: ``<host>_<pid>.async_llm.<ns>.pt.trace.json.gz``."""
ORCHESTRATOR_PID = 1

_PROCESS_META = frozenset({"process_name", "process_labels", "process_sort_index"})
_SCAN_BYTES = 1 << 22
_FLOW_EPS_US = 0.001
_TS_RE = re.compile(rb'"ts":\s*(-?[0-9][0-9.eE+-]*)')  # an escaped \"ts\" cannot match
_BASE_RE = re.compile(rb'"baseTimeNanoseconds"\s*:\s*(-?[0-9]+)')

Progress = Callable[[str], None]
TraceObserver = Callable[["TraceSource", Mapping[str, Any], int], None]
"""Called with each trace as loaded (before it is rewritten) and its host's clock offset."""


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


def is_trace_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TRACE_SUFFIXES)


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
                if path == slim:  # a slimmed copy: used when its original is absent
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
    observer: TraceObserver | None = None,
) -> Path:
    """Write ``session_dir/timeline.json.gz`` (see the module's docstring) and return its path.

    ``stage_indices`` orders stages that no span names (spans' ``stage_index`` wins);
    ``prefer_slim`` uses slimmed copies where they exist; ``observer`` sees each trace as it
    is loaded, so that callers can compute statistics without loading it a second time. A
    trace that cannot be read, or a stage without a clock estimate (offset 0 is then assumed),
    is noted in ``metadata.warnings``.
    """
    session_dir = Path(session_dir)
    report = progress or (lambda _msg: None)
    sources = find_traces(session_dir, prefer_slim=prefer_slim)
    resolved = {src.key: resolve_clock(clocks, src.stage, src.replica) for src in sources}
    offset_of = {key: est.offset_ns if est else 0 for key, (est, _) in resolved.items()}
    warnings = [
        f"no clock estimate for {key!r}: its offset is taken as 0"
        for key, (est, _) in resolved.items()
        if est is None
    ]
    indices = _stage_order(spans, stage_indices, sources)

    starts = [s.start_unix_ns for s in spans]
    for src in sources:
        report(f"scanning {src.path.relative_to(session_dir)}")
        base_ns, first_ts = _scan_start(src.path)
        if first_ts is not None:
            starts.append(base_ns - offset_of[src.key] + int(first_ts * 1000) - 1)
    origin = min(starts, default=0)

    out = session_dir / TIMELINE_NAME
    pids = iter(range(ORCHESTRATOR_PID + 1, 1 << 30))
    per_kind = Counter((s.key, s.frontend) for s in sources)
    traces: list[dict[str, Any]] = []
    with TraceWriter(out) as writer:
        writer.write(orchestrator_events(spans, origin_ns=origin))
        for src in sources:
            rel = str(src.path.relative_to(session_dir))
            try:
                trace = load_trace(src.path)
            except (OSError, ValueError) as exc:
                warnings.append(f"{rel} skipped: {exc}")
                logger.warning("timeline: %s skipped: %s", rel, exc)
                continue
            offset = offset_of[src.key]
            if observer is not None:
                observer(src, trace, offset)
            label = src.key + (" front end" if src.frontend else "")
            if per_kind[(src.key, src.frontend)] > 1:
                label += f" {_rank_of(trace, src.path)}"
            events, info = _rewrite(trace, origin + offset, label, indices[src.stage], pids, rel)
            warnings.extend(info.pop("warnings"))
            traces.append({"stage": src.stage, "replica": src.replica, "file": rel, **info})
            report(f"stage {src.key}: {len(events):,} events")
            writer.write(events)
            del trace, events
        metadata = {
            "origin_unix_ns": origin,
            "time_base": "orchestrator wall clock; ts are µs since origin_unix_ns",
            "clock_offsets": {
                key: {"offset_ns": offset_of[key], "error_ns": est and est.error_ns, "clock": name}
                for key, (est, name) in resolved.items()
            },
            "stage_indices": indices,
            "traces": traces,
            "requests": len({s.request_id for s in spans}),
            "warnings": warnings,
        }
        path = writer.close({"displayTimeUnit": "ms", "metadata": metadata})
    logger.info("timeline %s: %d events from %d traces", path, writer.events, len(traces))
    return path


def orchestrator_events(spans: Iterable[RequestSpan], *, origin_ns: int) -> list[dict[str, Any]]:
    """The orchestrator's track: a thread per request and stage; flows between stages.

    Each (request, stage) pair has its own thread, named ``<request> · <stage>`` and sorted
    by request, then stage: with a streaming hand-off the next stage starts before the
    previous one ends, and spans on one thread would overlap without nesting. A flow arrow
    leaves the previous stage's span at the next stage's start (or as late inside that span
    as it can, when the next stage starts after it ended) and ends at the next span's start.
    """
    pid = ORCHESTRATOR_PID
    events: list[dict[str, Any]] = [
        _meta("process_name", pid, 0, {"name": "orchestrator"}),
        _meta("process_sort_index", pid, 0, {"sort_index": -1}),
    ]
    by_request: dict[str, list[RequestSpan]] = {}
    for span in sorted(spans, key=lambda s: (s.start_unix_ns, s.stage_index)):
        by_request.setdefault(span.request_id, []).append(span)
    tids = iter(range(1, 1 << 31))
    flow = 0
    for request_id, chain in by_request.items():
        chain.sort(key=lambda s: (s.stage_index, s.start_unix_ns))
        before: tuple[int, float, float] | None = None  # the previous span's tid, start, end
        for span in chain:
            tid = next(tids)
            name = f"{request_id} · {span.stage}" + (f" ({span.replica})" if span.replica else "")
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
            }
            events.append(_span(f"stage {span.stage}", pid, tid, ts, end - ts, args))
            if span.first_output_unix_ns >= span.start_unix_ns:
                first = min(_us(span.first_output_unix_ns - origin_ns), end)
                events.append(_span("queued→first output", pid, tid, ts, first - ts, {}))
            if before is not None:
                flow += 1
                prev_tid, prev_start, prev_end = before
                flow_id = (pid << 32) | flow
                # inside the previous span, and never after the arrow's end
                at = max(prev_start, min(ts, round(prev_end - _FLOW_EPS_US, 3)))
                events.append(_flow("s", flow_id, pid, prev_tid, min(at, ts)))
                events.append(_flow("f", flow_id, pid, tid, ts) | {"bp": "e"})
            before = (tid, ts, end)
    return events


def _rewrite(
    trace: Mapping[str, Any],
    shift_ns: int,
    label: str,
    sort_index: int,
    pids: Iterator[int],
    rel: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A trace's events with new pids, ts on the timeline's clock and collision-free flow ids.

    ``shift_ns`` is the origin on the trace host's clock: ts' = (base - shift_ns)/1000 + ts.
    """
    warnings: list[str] = []
    base = trace.get("baseTimeNanoseconds")
    if type(base) is not int:
        warnings.append(f"{rel} has no baseTimeNanoseconds: its ts were read as unix µs")
        base = 0
    shift_us = (base - shift_ns) / 1000
    events = [e for e in trace["traceEvents"] if type(e) is dict]
    counts = Counter(_pid_key(e.get("pid")) for e in events)
    real = [p for p in counts if type(p) is int]
    primary = max(real, key=lambda p: counts[p]) if real else None
    new_pid = {p: next(pids) for p in [primary, *(p for p in real if p != primary)]}
    names = _process_meta(events, "process_name", "name")
    # Kineto names a GPU's process like the host's (python3) and labels it "GPU 0"
    labels = _process_meta(events, "process_labels", "labels")
    main = new_pid[primary]
    out: list[dict[str, Any]] = []
    seen_meta: set[tuple[Any, ...]] = set()
    flow_ids: dict[tuple[str, str], int] = {}
    untimed = 0
    for ev in events:
        pid = new_pid.get(_pid_key(ev.get("pid")), main)
        ev["pid"] = pid
        ph = ev.get("ph")
        if ph == "M":
            key = (ev.get("name"), pid, _pid_key(ev.get("tid")))
            if ev.get("name") not in _PROCESS_META and key not in seen_meta:
                seen_meta.add(key)
                ev["ts"] = 0
                out.append(ev)
            continue
        ts = ev.get("ts")
        if not isinstance(ts, (int, float)):
            untimed += 1
            continue
        ev["ts"] = round(ts + shift_us, 3)
        if ph in FLOW_PHASES:
            # ids unique to this file, prefixed by its main pid: no other file can have them
            ev["id"] = flow_ids.setdefault(flow_key(ev), (main << 32) | (len(flow_ids) + 1))
            ev.pop("id2", None)
        out.append(ev)
    out, broken = drop_incomplete_flows(out)
    if untimed or broken:
        logger.debug("%s: dropped %d events without ts, %d flow halves", rel, untimed, broken)
    for orig, pid in new_pid.items():
        own = names.get(orig, "") if orig is not None else ""
        tag = labels.get(orig, "") if orig is not None else ""
        name = label if pid == main else f"{label} · {tag or own or f'pid {orig}'}"
        text = ", ".join(filter(None, [own, tag, rel]))
        out.append(_meta("process_name", pid, 0, {"name": name}))
        out.append(_meta("process_labels", pid, 0, {"labels": text}))
        out.append(_meta("process_sort_index", pid, 0, {"sort_index": sort_index}))
    return out, {"pids": sorted(new_pid.values()), "events": len(out), "warnings": warnings}


def _process_meta(events: Iterable[dict[str, Any]], kind: str, key: str) -> dict[Any, str]:
    """Original pid → the ``args[key]`` of its ``kind`` metadata event (the last one wins)."""
    return {
        _pid_key(e.get("pid")): str(e["args"].get(key, ""))
        for e in events
        if e.get("ph") == "M" and e.get("name") == kind and type(e.get("args")) is dict
    }


def _scan_start(path: Path) -> tuple[int, float | None]:
    """A trace's ``baseTimeNanoseconds`` (0 if absent) and smallest ``ts``, from its text."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    base: int | None = None
    lowest: float | None = None
    tail = b""
    try:
        with opener(path, "rb") as fh:
            while True:
                block = fh.read(_SCAN_BYTES)
                data = tail + block
                if block:  # scan up to the last comma: no key or number is cut in two
                    cut = data.rfind(b",") + 1
                    data, tail = data[:cut], data[cut:]
                if base is None and (found := _BASE_RE.search(data)):
                    base = int(found.group(1))
                if values := _TS_RE.findall(data):
                    low = min(map(float, values))
                    lowest = low if lowest is None else min(lowest, low)
                if not block:
                    break
    except (OSError, EOFError, ValueError) as exc:
        logger.warning("could not scan %s for its start: %s", path, exc)
    return base or 0, lowest


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


def _rank_of(trace: Mapping[str, Any], path: Path) -> str:
    info = trace.get("distributedInfo")
    if isinstance(info, dict) and isinstance(info.get("rank"), int):
        return f"rank{info['rank']}"
    return strip_trace_suffix(path.name)


def _pid_key(pid: Any) -> Any:
    return pid if type(pid) in (int, str) else repr(pid)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def _meta(kind: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "ts": 0, "args": args}


def _span(
    name: str, pid: int, tid: int, ts: float, dur: float, args: dict[str, Any]
) -> dict[str, Any]:
    return dict(
        ph="X", cat="request", name=name, pid=pid, tid=tid, ts=ts, dur=round(dur, 3), args=args
    )


def _flow(ph: str, flow_id: int, pid: int, tid: int, ts: float) -> dict[str, Any]:
    return dict(ph=ph, cat="request", name="handoff", id=flow_id, pid=pid, tid=tid, ts=ts)
