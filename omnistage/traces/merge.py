"""One trace's share of the merged timeline, made in one streaming pass (a worker's job).

:func:`merge_trace` reads a trace chunk by chunk and, in the same pass:

* rewrites each event onto the timeline: a new pid from the trace's own block (so no two
  traces share one), ``ts`` on the orchestrator's clock in µs since the timeline's origin
  (``(baseTimeNanoseconds - offset_ns - origin_ns) / 1000 + ts``), flow ids prefixed by the
  trace's number;
* writes those events as JSON (a deflate part of ``timeline.json.gz``) and as Perfetto
  packets (a part of the protobuf timeline);
* feeds the op table and the busy intervals of the summary.

So each trace is read once, whatever is made of it, and only one chunk of it is in memory.
It runs in a worker process per trace (:mod:`omnistage.traces.timeline`), or in-process for
small sessions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from omnistage.traces.events import (
    FLOW_PHASES,
    PROCESS_META,
    Event,
    RawEvent,
    TraceError,
    args_of,
    flow_key,
    hashable,
    strip_trace_suffix,
)
from omnistage.traces.nesting import union
from omnistage.traces.optable import OpStat, OpTableBuilder
from omnistage.traces.perfetto import ProtoEncoder
from omnistage.traces.reader import TraceReader
from omnistage.traces.steps import STEP_PREFIXES
from omnistage.traces.writer import DeflatePart, Part, events_json

logger = logging.getLogger(__name__)

PID_BLOCK = 1000
"""Each trace's processes get pids ``(number + 1) * PID_BLOCK + k``."""


@dataclass(frozen=True)
class TraceJob:
    """What a worker needs to merge one trace (plain data: it crosses process boundaries)."""

    number: int
    path: Path
    rel: str
    label: str
    """The name of the trace's main process: ``thinker``, ``thinker front end`` …"""
    sort_index: int
    host_origin_ns: int
    """The timeline's origin on the trace host's clock (origin plus the host's offset)."""
    offset_ns: int
    json_part: Path
    proto_part: Path
    rank_label: bool = False
    """Add the trace's rank to the label (several traces of one kind in one stage)."""
    role: str = "all"
    """``all``: the timeline's parts and the stats in one pass; ``timeline`` or ``stats``
    alone, so that a big trace's two halves of the work run on two cores."""


@dataclass
class TraceResult:
    """What merging one trace gave: its parts, its op table, its busy time, its problems."""

    number: int
    rel: str
    label: str
    events: int = 0
    json_part: Part | None = None
    proto_part: Part | None = None
    descriptors: bytes = b""
    ops: list[OpStat] = field(default_factory=list)
    host_busy: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
    device_busy: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
    steps: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
    """The engine steps' annotations (:mod:`omnistage.traces.steps`), joined where they
    overlap, on the orchestrator's unix µs."""
    first_us: float = np.inf
    last_us: float = -np.inf
    """First and last op, orchestrator-clock unix µs."""
    pids: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    """Why the trace could not be merged (then it has no parts): names the file."""
    unbound_flows: int = 0


def combine(timeline: TraceResult, stats: TraceResult) -> TraceResult:
    """One trace's result from its two halves (the timeline's problems are the trace's)."""
    timeline.ops = stats.ops
    timeline.host_busy, timeline.device_busy = stats.host_busy, stats.device_busy
    timeline.steps = stats.steps
    timeline.first_us, timeline.last_us = stats.first_us, stats.last_us
    timeline.error = timeline.error or stats.error
    return timeline


def merge_trace(job: TraceJob) -> TraceResult:
    """Merge one trace (see the module's docstring). Never raises for a bad trace: the result
    says what went wrong, and the parts of what was read are discarded.

    Each piece of the JSON part starts with a comma: the timeline's own events (the
    orchestrator's process, always named) come before every trace's.
    """
    result = TraceResult(job.number, job.rel, job.label)
    if job.role == "stats":
        try:
            read_stats(job.path, job.rel, job.offset_ns, result)
        except (TraceError, OSError) as exc:
            result.error = _problem(job, exc)
        return result
    json_part = DeflatePart(job.json_part)
    proto_part = DeflatePart(job.proto_part)
    try:
        _merge(job, result, json_part, proto_part)
    except (TraceError, OSError) as exc:
        json_part.abort()
        proto_part.abort()
        result.error = _problem(job, exc)
        result.events = 0
        logger.warning("timeline: %s", result.error)
        return result
    except BaseException:
        json_part.abort()
        proto_part.abort()
        raise
    result.json_part = json_part.close()
    result.proto_part = proto_part.close()
    return result


def _problem(job: TraceJob, exc: Exception) -> str:
    """What went wrong with a trace, naming its file (once)."""
    return str(exc) if job.rel in str(exc) else f"{job.rel}: {exc}"


def _merge(job: TraceJob, result: TraceResult, json_part: DeflatePart, proto: DeflatePart) -> None:
    merger = _Merger(job, result)
    builder = merger.builder
    with TraceReader(job.path, name=job.rel, raw_args=True) as reader:
        base = reader.base_ns
        if base is None:
            result.warnings.append(
                f"{job.rel} has no baseTimeNanoseconds: its ts were read as unix µs"
            )
            base = 0
        shift_us = (base - job.host_origin_ns) / 1000
        for chunk in reader.chunks():
            if builder is not None:
                builder.add(chunk)
            out = merger.retime(chunk, shift_us)
            if out:  # after the orchestrator's events, which always come first: a comma
                json_part.write(b"," + events_json(out))
            proto.write(merger.encoder.encode(out))
            result.events += len(out)
        merger.warn(reader.bad_events)
        rank = _rank(reader.header, job) if job.rank_label else ""
    merger.finish(json_part, proto, rank)
    if builder is not None:
        _keep_stats(builder, result, (base - job.offset_ns) / 1000)


class _Merger:
    """One trace's state while it is merged: its pids, its process metadata, what was left
    out. :meth:`retime` is called once a chunk, and its loop keeps what it reads in locals."""

    def __init__(self, job: TraceJob, result: TraceResult) -> None:
        self.job = job
        self.result = result
        self.encoder = ProtoEncoder(job.number + 2)
        self.builder = OpTableBuilder() if job.role == "all" else None
        self.pid_base = (job.number + 1) * PID_BLOCK
        self.flows = _FlowIds(job.number)
        self.pids: dict[Any, int] = {}
        self.counts: dict[int, int] = {}
        """Complete events per pid: the one with most is the trace's main process."""
        self.names: dict[int, str] = {}
        self.labels: dict[int, str] = {}
        self.seen_meta: set[tuple[Any, ...]] = set()
        self.untimed = self.no_dur = self.early = 0

    def retime(self, chunk: list[Any], shift_us: float) -> list[Any]:
        """A chunk's events on the timeline (new pids, ts, flow ids); the process metadata
        and the events left out are kept aside."""
        pids, counts, names, labels = self.pids, self.counts, self.names, self.labels
        seen_meta, pid_base, new_flow_id = self.seen_meta, self.pid_base, self.flows.new_id
        untimed = no_dur = early = 0
        out = []
        for ev in chunk:
            key = ev.pid
            # each int pid gets one of its own (the first one pid_base); the others
            # (Kineto's "Traces", "Spans" …) join the first
            pid = pids.get(key, -1) if type(key) is int else pid_base
            if pid < 0:
                pid = pids[key] = pid_base + len(pids)
            ev.pid = pid
            ph = ev.ph
            if ph == "M":
                name = ev.name
                if name in PROCESS_META:
                    args = args_of(ev.args)
                    if name == "process_name":
                        names[pid] = str(args.get("name", ""))
                    elif name == "process_labels":
                        labels[pid] = str(args.get("labels", ""))
                    continue
                mkey = (name, pid, hashable(ev.tid))
                if mkey not in seen_meta:
                    seen_meta.add(mkey)
                    ev.ts = 0.0
                    out.append(ev)
                continue
            ts = ev.ts
            if ts is None:
                untimed += 1
                continue
            t = ts + shift_us
            if t < 0:
                early += 1
                t = 0.0
            ev.ts = int(t * 1000.0 + 0.5) / 1000.0  # whole ns (round(t, 3) is 6× slower)
            if ph == "X":
                if ev.dur is None or ev.dur < 0:
                    no_dur += 1
                    continue
                counts[pid] = counts.get(pid, 0) + 1
            elif ph in FLOW_PHASES:
                ev.id = new_flow_id(ev)
                ev.id2 = None
            out.append(ev)
        self.untimed += untimed
        self.no_dur += no_dur
        self.early += early
        return out

    def warn(self, bad_events: int) -> None:
        """Say what was left out or moved (``bad_events``: the reader's non-events)."""
        rel, warnings = self.job.rel, self.result.warnings
        for count, what in (
            (self.untimed, "events without a ts"),
            (self.no_dur, "complete events without a valid dur"),
        ):
            if count:
                warnings.append(f"{rel}: {count:,} {what} were left out")
        if self.early:
            warnings.append(
                f"{rel}: {self.early:,} events before the timeline's start were put at its start"
            )
        if bad_events:
            warnings.append(f"{rel}: {bad_events:,} events that are not trace events were skipped")

    def finish(self, json_part: DeflatePart, proto: DeflatePart, rank: str) -> None:
        """Name, label and order the trace's processes, and close its protobuf packets."""
        job, result, encoder, pid_base = self.job, self.result, self.encoder, self.pid_base
        counts = self.counts
        main = max(counts, key=lambda p: counts[p]) if counts else pid_base
        label = f"{job.label} {rank}".strip()
        pids = sorted(set(self.pids.values()) | {main})
        meta = []
        for pid in pids:
            own, tag = self.names.get(pid, ""), self.labels.get(pid, "")
            name = label if pid == main else f"{label} · {tag or own or f'pid {pid}'}"
            where = ", ".join(filter(None, [own, tag, job.rel]))
            rank_in = job.sort_index * PID_BLOCK + pid - pid_base + (0 if pid == main else 1)
            meta.append(_meta("process_name", pid, {"name": name}))
            meta.append(_meta("process_labels", pid, {"labels": where}))
            meta.append(_meta("process_sort_index", pid, {"sort_index": job.sort_index}))
            encoder.process_names[pid] = name
            encoder.process_ranks[pid] = rank_in
        json_part.write(b"," + events_json(meta))
        result.events += len(meta)
        proto.write(encoder.finish())
        result.descriptors = encoder.descriptors()
        result.unbound_flows = encoder.unbound_flows
        result.pids = pids


def read_stats(path: Path, rel: str, offset_ns: int, result: TraceResult) -> None:
    """Only the op table and the busy time of a trace, into ``result``: the other half of a
    big trace's work, and the summary's when there is no timeline.

    Raises:
        TraceError: the trace cannot be read. OSError: it cannot be opened.
    """
    builder = OpTableBuilder()
    with TraceReader(path, name=rel, raw_args=True) as reader:
        for chunk in reader.chunks():
            builder.add(chunk)
        base = reader.base_ns or 0
    _keep_stats(builder, result, (base - offset_ns) / 1000)


def _keep_stats(builder: OpTableBuilder, result: TraceResult, shift_unix: float) -> None:
    """The op table, the busy intervals and the engine steps on the orchestrator's unix µs."""
    result.ops = builder.stats()
    starts, ends = builder.named_intervals(STEP_PREFIXES)
    result.steps = union(starts + shift_unix, ends + shift_unix)
    for attr, (starts, ends) in (
        ("host_busy", builder.host_intervals()),
        ("device_busy", builder.device_intervals()),
    ):
        merged = union(starts + shift_unix, ends + shift_unix)
        setattr(result, attr, merged)
        if merged[0].size:
            result.first_us = min(result.first_us, float(merged[0][0]))
            result.last_us = max(result.last_us, float(merged[1][-1]))


def _rank(header: dict[str, Any], job: TraceJob) -> str:
    info = header.get("distributedInfo")
    if isinstance(info, dict) and isinstance(info.get("rank"), int):
        return f"rank{info['rank']}"
    return strip_trace_suffix(job.path.name)


def _meta(kind: str, pid: int, args: dict[str, Any]) -> Event:
    return Event(ph="M", name=kind, pid=pid, tid=0, ts=0.0, args=args)


class _FlowIds:
    """New flow ids, unique to one trace: ``(number + 2) << 48 | category << 40 | id``.

    Kineto's ids are ints (a launch's correlation): they keep their value, in a range of the
    trace's and the category's own, so no table of every flow is needed. Other ids (strings,
    or ints past 40 bits) are numbered in the last category range, with a table of those.
    """

    def __init__(self, number: int) -> None:
        self._base = (number + 2) << 48
        self._cats: dict[str, int] = {}
        self._others: dict[tuple[str, str], int] = {}

    def new_id(self, ev: Event | RawEvent) -> int:
        ident = ev.id if ev.id is not None else ev.id2
        cat = ev.cat or ""
        index = self._cats.get(cat)
        if index is None and len(self._cats) < 255:
            index = self._cats[cat] = len(self._cats)
        if index is not None and type(ident) is int and 0 <= ident < 1 << 40:
            return self._base | index << 40 | ident
        key = flow_key(ev)
        found = self._others.get(key)
        if found is None:
            found = self._others[key] = self._base | 255 << 40 | len(self._others)
        return found
