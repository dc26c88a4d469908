"""Operator tables from torch.profiler traces, built chunk by chunk in compact columns.

The stage writes torch's own op table when its engine does; when it does not, and for every
report, this module builds an equivalent one from the trace.

What is counted:

* host ops: complete events (``"ph": "X"``) of category ``cpu_op`` or ``user_annotation``
  (``Operator`` in older Kineto versions). Python frames, runtime calls and anything else
  are not rows;
* self CPU time: an op's duration less that of its direct child ops, nested by
  :func:`omnistage.traces.nesting.parents` per ``(pid, tid)``. Python frames are transparent.
  As torch's ``_remove_dup_nodes`` does, an op whose only child has the same name merges with
  it: one call, the outer one's total time;
* device time: kernels, memcpy and memset (``kernel``, ``gpu_memcpy``, ``gpu_memset``), given
  to the host op with the same ``External id`` (0 means none), else to the innermost op
  around the runtime call with the same ``correlation``, else to a row of their own.

Differences from torch's own table, by design: torch also has rows for Python frames and
runtime calls (``cudaLaunchKernel``) and takes their time out of the enclosing op's self
time; here it stays there. Torch lists every kernel as a row too; here a kernel is a row only
when no op launched it.

Memory: each counted event costs about 40 bytes of columns (no Python object per event), so
a trace of millions of events is tabled in a few hundred MB at most.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from omnistage.traces.events import (
    DEVICE,
    HOST_OP_CATEGORIES,
    RUNTIME,
    SKIP,
    Event,
    RawEvent,
    classify,
    describe,
    hashable,
    links_of,
)
from omnistage.traces.nesting import parents, sort_order, tolerance
from omnistage.traces.reader import TraceReader, to_events

MAX_NAME_WIDTH = 55
"""Names longer than this are truncated in the text table (torch uses the same width)."""

_COLUMN_WIDTH = 12
_GAP = "  "
_INF = math.inf


@dataclass(frozen=True)
class OpStat:
    """One op name's time over a whole trace, in microseconds."""

    name: str
    calls: int
    self_cpu_us: float
    """Duration of its host events less that of their direct child ops."""
    total_cpu_us: float
    """Inclusive time (nested calls of the same name count twice)."""
    self_device_us: float
    """Time of the device events it launched; 0.0 if none."""

    def __add__(self, other: OpStat) -> OpStat:
        return OpStat(
            self.name,
            self.calls + other.calls,
            self.self_cpu_us + other.self_cpu_us,
            self.total_cpu_us + other.total_cpu_us,
            self.self_device_us + other.self_device_us,
        )


class OpTableBuilder:
    """Feed it a trace's chunks (:meth:`add`), then read :meth:`stats`.

    It also keeps what a summary needs of the same events: the host ops' and device events'
    intervals (:meth:`host_intervals`, :meth:`device_intervals`), on the trace's own clock.
    """

    def __init__(self, host_categories: Collection[str] = HOST_OP_CATEGORIES) -> None:
        self._host_cats = frozenset(c.lower() for c in host_categories)
        self._kinds: dict[Any, int] = {}
        self._names: dict[str, int] = {}
        self._threads: dict[tuple[Any, Any], int] = {}
        # host ops and runtime calls (name -1)
        self._th, self._name, self._ext, self._corr = array("q"), array("q"), array("q"), array("q")
        self._ts, self._dur = array("d"), array("d")
        # device events
        self._d_name, self._d_ext, self._d_corr = array("q"), array("q"), array("q")
        self._d_ts, self._d_dur = array("d"), array("d")

    def add(self, events: Iterable[Event | RawEvent]) -> None:
        """Add a chunk's events. Their ``External id`` and ``correlation`` are read for the
        whole chunk at once (:func:`~omnistage.traces.events.links_of`)."""
        kinds, names, threads, host = self._kinds, self._names, self._threads, self._host_cats
        picked: list[Event | RawEvent] = []
        kind_of: list[int] = []
        for ev in events:
            if ev.ph != "X":
                continue
            cat = ev.cat
            kind = kinds.get(cat)
            if kind is None:
                kind = kinds[cat] = classify(cat, host)
            if kind == SKIP:
                continue
            ts, dur = ev.ts, ev.dur
            if ts is None or dur is None or not (0.0 <= dur < _INF and -_INF < ts < _INF):
                continue
            picked.append(ev)
            kind_of.append(kind)
        if not picked:
            return
        th_a, name_a, ext_a, corr_a = self._th, self._name, self._ext, self._corr
        ts_a, dur_a = self._ts, self._dur
        for ev, kind, (ext, corr) in zip(picked, kind_of, links_of(picked), strict=True):
            if kind == DEVICE:
                self._d_name.append(self._name_id(ev.name))
                self._d_ext.append(ext)
                self._d_corr.append(corr)
                self._d_ts.append(ev.ts or 0.0)  # never None here: checked above
                self._d_dur.append(ev.dur or 0.0)  # never None here: checked above
                continue
            if kind == RUNTIME:
                if corr < 0:
                    continue
                name_id = -1
            else:
                name = ev.name
                found = names.get(name) if type(name) is str else None
                name_id = self._name_id(name) if found is None else found
            tid = ev.tid
            key = (ev.pid, tid if type(tid) is int else hashable(tid))
            th = threads.get(key)
            if th is None:
                th = threads[key] = len(threads)
            th_a.append(th)
            name_a.append(name_id)
            ext_a.append(ext)
            corr_a.append(corr)
            ts_a.append(ev.ts or 0.0)  # never None here: checked above
            dur_a.append(ev.dur or 0.0)  # never None here: checked above

    def _name_id(self, name: Any) -> int:
        text = name if type(name) is str else ("<unnamed>" if name is None else str(name))
        found = self._names.get(text)
        if found is None:
            found = self._names[text] = len(self._names)
        return found

    def host_intervals(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Starts and ends of the host ops (not runtime calls), µs on the trace's clock."""
        name = np.frombuffer(self._name, dtype=np.int64)
        ts = np.frombuffer(self._ts, dtype=np.float64)[name >= 0]
        return ts, ts + np.frombuffer(self._dur, dtype=np.float64)[name >= 0]

    def named_intervals(
        self, prefixes: tuple[str, ...]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Starts and ends of the host ops whose name starts with one of ``prefixes`` (the
        engine steps' annotations), µs on the trace's clock."""
        ids = [i for name, i in self._names.items() if name.startswith(prefixes)]
        name = np.frombuffer(self._name, dtype=np.int64)
        pick = np.isin(name, np.array(ids, dtype=np.int64))
        ts = np.frombuffer(self._ts, dtype=np.float64)[pick]
        return ts, ts + np.frombuffer(self._dur, dtype=np.float64)[pick]

    def device_intervals(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        ts = np.frombuffer(self._d_ts, dtype=np.float64)
        return ts, ts + np.frombuffer(self._d_dur, dtype=np.float64)

    def stats(self) -> list[OpStat]:
        """Every op, sorted by self CPU time, then self device time, then name."""
        labels = list(self._names)
        n_names = len(labels)
        th = np.frombuffer(self._th, dtype=np.int64)
        name = np.frombuffer(self._name, dtype=np.int64)
        ts = np.frombuffer(self._ts, dtype=np.float64)
        dur = np.frombuffer(self._dur, dtype=np.float64)
        calls = np.zeros(n_names)
        self_cpu = np.zeros(n_names)
        total = np.zeros(n_names)
        device = np.zeros(n_names)
        launched_by: dict[int, int] = {}
        if ts.size:
            order = sort_order(th, ts, dur)
            th, name, ts, dur = th[order], name[order], ts[order], dur[order]
            corr = np.frombuffer(self._corr, dtype=np.int64)[order]
            runtime = name < 0
            eps = tolerance(float(np.max(np.abs(ts))))
            parent = parents(th, ts, dur, runtime, eps=eps)
            host = ~runtime
            hn, hd = name[host], dur[host]
            calls += np.bincount(hn, minlength=n_names)
            total += np.bincount(hn, weights=hd, minlength=n_names)
            self_cpu += np.bincount(hn, weights=hd, minlength=n_names)
            child = host & (parent >= 0)
            pos = parent[child]
            self_cpu -= np.bincount(name[pos], weights=dur[child], minlength=n_names)
            # an op whose only child has its name merges with it (torch's _remove_dup_nodes)
            kids = np.bincount(pos, minlength=ts.size)
            only = child & (kids[np.maximum(parent, 0)] == 1)
            same = only & (name == name[np.maximum(parent, 0)])
            calls -= np.bincount(name[same], minlength=n_names)
            total -= np.bincount(name[same], weights=dur[same], minlength=n_names)
            inside = runtime & (parent >= 0)
            launched_by = dict(
                zip(corr[inside].tolist(), name[parent[inside]].tolist(), strict=True)
            )
        if self._d_dur:
            self._attribute_device(launched_by, device, calls, n_names)
        stats = [
            OpStat(labels[i], int(calls[i]), float(self_cpu[i]), float(total[i]), float(device[i]))
            for i in range(n_names)
            if calls[i] > 0 or device[i] > 0
        ]
        stats.sort(key=lambda s: (-s.self_cpu_us, -s.self_device_us, s.name))
        return stats

    def _attribute_device(
        self,
        launched_by: dict[int, int],
        device: npt.NDArray[np.float64],
        calls: npt.NDArray[np.float64],
        n_names: int,
    ) -> None:
        """Add each device event's time to the op that launched it, or to a row of its own
        (named after it, one call per event). ``device`` and ``calls`` change in place."""
        d_ext = np.frombuffer(self._d_ext, dtype=np.int64)
        ext = np.frombuffer(self._ext, dtype=np.int64)
        name = np.frombuffer(self._name, dtype=np.int64)
        pick = (name >= 0) & np.isin(ext, np.unique(d_ext[d_ext > 0]))
        owner = dict(zip(ext[pick].tolist(), name[pick].tolist(), strict=True))
        targets = np.empty(d_ext.size, dtype=np.int64)
        alone = np.zeros(d_ext.size, dtype=bool)
        rows = zip(self._d_ext.tolist(), self._d_corr.tolist(), self._d_name.tolist(), strict=True)
        for i, (e, c, own) in enumerate(rows):
            target = owner.get(e) if e > 0 else None
            if target is None and c >= 0:
                target = launched_by.get(c)
            if target is None:
                target, alone[i] = own, True
            targets[i] = target
        d_dur = np.frombuffer(self._d_dur, dtype=np.float64)
        device += np.bincount(targets, weights=d_dur, minlength=n_names)
        calls += np.bincount(targets[alone], minlength=n_names)


def op_stats(trace: Path | Mapping[str, Any], **kwargs: Any) -> list[OpStat]:
    """The op table of a trace file, read as a stream (see the module's docstring), or of a
    trace already in memory as JSON data (``{"traceEvents": [...]}``, small traces).

    Raises:
        TraceError: the file is not a readable trace (ValueError: the data has no events).
        OSError: it cannot be opened.
    """
    builder = OpTableBuilder(**kwargs)
    if isinstance(trace, Mapping):
        events = trace.get("traceEvents")
        if not isinstance(events, list):
            raise ValueError(
                f"not a Chrome trace: expected a 'traceEvents' list, got {describe(events)}"
            )
        builder.add(to_events(events))
        return builder.stats()
    with TraceReader(trace, raw_args=True) as reader:
        for chunk in reader.chunks():
            builder.add(chunk)
    return builder.stats()


def merge_stats(tables: Iterable[Sequence[OpStat]]) -> dict[str, OpStat]:
    merged: dict[str, OpStat] = {}
    for table in tables:
        for op in table:
            old = merged.get(op.name)
            merged[op.name] = op if old is None else old + op
    return merged


def format_op_table(stats: Sequence[OpStat], *, row_limit: int = 50, title: str = "") -> str:
    """Stats as a fixed-width text table in the style of torch's ``table()``.

    Rows in the order given, at most ``row_limit`` (all if 0 or less). Percentages are of
    the sum of all ``stats``' self times. Device columns appear only with device time.
    """
    total_cpu = math.fsum(s.self_cpu_us for s in stats)
    total_device = math.fsum(s.self_device_us for s in stats)
    with_device = any(s.self_device_us > 0 for s in stats)
    rows = list(stats) if row_limit <= 0 else list(stats[:row_limit])
    headers = ["Self CPU %", "Self CPU", "CPU total"]
    if with_device:
        headers += ["Self Device", "Self Device %"]
    headers.append("# of Calls")
    widths = [max(_COLUMN_WIDTH, len(h)) for h in headers]
    name_width = max([len("Name"), *(min(len(s.name), MAX_NAME_WIDTH) for s in rows)])

    def line(name: str, cells: Sequence[str]) -> str:
        parts = [name.ljust(name_width)]
        parts += [cell.rjust(width) for cell, width in zip(cells, widths, strict=True)]
        return _GAP.join(parts)

    rule = _GAP.join(["-" * name_width] + ["-" * w for w in widths])
    out = [title] if title else []
    out += [rule, line("Name", headers), rule]
    for s in rows:
        cells = [_share(s.self_cpu_us, total_cpu), _time(s.self_cpu_us), _time(s.total_cpu_us)]
        if with_device:
            cells += [_time(s.self_device_us), _share(s.self_device_us, total_device)]
        cells.append(str(s.calls))
        out.append(line(_truncate(s.name), cells))
    out += [rule, f"Self CPU time total: {_time(total_cpu)}"]
    if with_device:
        out.append(f"Self Device time total: {_time(total_device)}")
    return "\n".join(out) + "\n"


def build_op_table(trace_path: Path, *, row_limit: int = 50, title: str = "") -> str:
    """The op table of a trace file, rendered (see :func:`op_stats`)."""
    return format_op_table(op_stats(trace_path), row_limit=row_limit, title=title)


def _truncate(name: str) -> str:
    return name if len(name) <= MAX_NAME_WIDTH else name[: MAX_NAME_WIDTH - 3] + "..."


def _time(time_us: float) -> str:
    """Microseconds in torch's units: 1.234s, 1.234ms or 1.234us."""
    if abs(time_us) >= 1e6:
        return f"{time_us / 1e6:.3f}s"
    if abs(time_us) >= 1e3:
        return f"{time_us / 1e3:.3f}ms"
    return f"{time_us:.3f}us"


def _share(time_us: float, total_us: float) -> str:
    return "0.00%" if total_us == 0 else f"{time_us * 100.0 / total_us:.2f}%"
