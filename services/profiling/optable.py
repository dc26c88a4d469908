"""Operator tables built from torch.profiler Chrome traces.

The engine normally writes torch's own op table
(``key_averages().table(sort_by="self_cpu_time_total")``). When it does not, this module
builds an equivalent table from the Chrome trace (``*.pt.trace.json[.gz]``, Trace Event
Format as written by torch.profiler / Kineto). The aggregation is exposed as data
(:func:`op_stats`, :class:`OpStat`) so that reports and trace slimming can reuse it.

What is counted (see :func:`op_stats` for the details):

* host ops: complete events (``"ph": "X"``) of category ``cpu_op`` or ``user_annotation``
  (``Operator``, the name older Kineto versions used, is accepted too). ``python_function``
  events (added by ``with_stack=True``), CUDA runtime/driver calls, ``gpu_user_annotation``
  and everything else are not rows of the table;
* device time: complete events of category ``kernel``, ``gpu_memcpy`` or ``gpu_memset``
  (``Kernel``/``Memcpy``/``Memset`` in older traces), attributed to the host op that launched
  them.

Differences from torch's own table, by design: torch's table also has rows for Python frames
(when the profile was taken with ``with_stack=True``) and for CUDA runtime calls such as
``cudaLaunchKernel``, and it subtracts their time from the enclosing op's self time; here that
time stays in the self time of the enclosing op. Torch also lists every kernel as a row of its
own in addition to counting it in the launching op's device time; here a kernel is a row only
when it cannot be attributed to a host op.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HOST_OP_CATEGORIES: frozenset[str] = frozenset({"cpu_op", "user_annotation", "operator"})
"""Default host-side categories counted as ops (compared case-insensitively)."""

DEVICE_CATEGORIES: frozenset[str] = frozenset(
    {"kernel", "gpu_memcpy", "gpu_memset", "memcpy", "memset"}
)
"""Device-side categories whose time is counted as device time (compared case-insensitively)."""

RUNTIME_CATEGORIES: frozenset[str] = frozenset(
    {"cuda_runtime", "cuda_driver", "runtime", "hip_runtime", "xpu_runtime", "privateuse1_runtime"}
)
"""Host-side launch calls; never rows, only used to link a device event to its op."""

MAX_NAME_WIDTH = 55
"""Names longer than this are truncated in the text table (torch uses the same width)."""

_COLUMN_WIDTH = 12
_COLUMN_GAP = "  "
_MIN_EPS_US = 5e-4  # half a nanosecond: traces are written with nanosecond resolution

_SKIP, _HOST, _DEVICE, _RUNTIME = 0, 1, 2, 3
_INF = math.inf
_NO_ARGS: dict[str, Any] = {}
_BY_START = itemgetter(0, 1)


@dataclass(frozen=True)
class OpStat:
    """Aggregated time of one op name over a whole trace. Times are in microseconds."""

    name: str
    calls: int
    self_cpu_us: float
    """Self time of host-side op events: their duration minus that of their direct children."""
    total_cpu_us: float
    """Inclusive time of host-side op events (nested calls of the same name count twice)."""
    self_device_us: float
    """Time of device events (kernels, memcpy, memset) attributed to this op; 0.0 if none."""


def load_trace(path: Path) -> dict[str, Any]:
    """Read a Chrome trace written by torch.profiler, plain (``.json``) or gzipped (``.gz``).

    Compression is detected from the file's content, not its name. A trace in the JSON Array
    Format (a bare list of events) is returned as ``{"traceEvents": [...]}``. Bytes that are
    not UTF-8 are replaced with U+FFFD (with a warning): torch.profiler with ``with_stack=True``
    is known to write garbage into the names of Python frames whose code objects were freed
    while profiling (pytorch/pytorch#64345, #113564), and one bad name must not lose the trace.

    Raises:
        ValueError: the file is not valid (gzipped) JSON or not a trace; the message names it.
        OSError: the file cannot be opened (missing, unreadable).
    """
    path = Path(path)
    with path.open("rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    try:
        if gzipped:
            with gzip.open(path, "rb") as gz:
                raw = gz.read()
        else:
            raw = path.read_bytes()
        text = raw.decode("utf-8-sig", errors="replace")
        del raw
        data: Any = json.loads(text)
    except (gzip.BadGzipFile, EOFError, zlib.error, ValueError) as exc:
        kind = "gzipped JSON" if gzipped else "JSON"
        raise ValueError(f"{path} is not a Chrome trace: cannot read it as {kind}: {exc}") from exc
    if "\ufffd" in text:
        logger.warning("%s has bytes that are not UTF-8; they were replaced with U+FFFD", path)
    del text
    if isinstance(data, list):
        return {"traceEvents": data}
    if isinstance(data, dict) and isinstance(data.get("traceEvents"), list):
        return data
    raise ValueError(
        f"{path} is not a Chrome trace: expected a JSON object with a 'traceEvents' list "
        f"or a JSON list of events, got {_describe(data)}"
    )


def op_stats(
    trace: Mapping[str, Any], *, host_categories: Collection[str] = HOST_OP_CATEGORIES
) -> list[OpStat]:
    """Aggregate a trace's events per op name, sorted by self CPU time, then self device time.

    Only complete events (``"ph": "X"``) with a numeric, non-negative ``dur`` and ``ts``
    count. ``host_categories`` selects the host-side rows (default :data:`HOST_OP_CATEGORIES`).

    Self CPU time: within each ``(pid, tid)`` host ops nest. They are sorted by
    ``(ts, -dur)`` and walked with a stack, as torch's ``EventList._populate_cpu_children``
    does: an event is a child of the innermost open event that contains it entirely; one that
    starts at or after the end of the open event, or ends after it, closes it. Self time is
    the duration minus the summed duration of the direct children, children being counted
    host ops only (a Python frame between two ops is transparent). Boundaries are compared
    with a tolerance of a few nanoseconds (more for traces with huge absolute timestamps,
    whose float values cannot hold nanoseconds) so that a child ending exactly where its
    parent ends stays a child. As torch's ``_remove_dup_nodes`` does, an op whose only
    direct child has the same name is merged with it: the pair counts as one call and its
    inclusive time is the outer one's (self time is unchanged by the merge).

    Device time: each device event (categories in :data:`DEVICE_CATEGORIES`) goes to

    1. the host op whose ``args["External id"]`` equals the device event's ``External id``
       (Kineto gives a kernel the External id of the innermost op active when it was
       launched; an External id of 0 means none);
    2. failing that, the innermost host op around the runtime call (categories in
       :data:`RUNTIME_CATEGORIES`) whose ``args["correlation"]`` equals the device event's;
    3. failing that, a row named after the device event itself, with ``calls`` counting
       the device events and no CPU time.

    Raises:
        ValueError: ``trace`` has no ``traceEvents`` list.
    """
    events = trace.get("traceEvents")
    if not isinstance(events, list):
        raise ValueError(
            f"not a Chrome trace: expected a 'traceEvents' list, got {_describe(events)}"
        )
    host_cats = frozenset(c.lower() for c in host_categories)
    kinds: dict[Any, int] = {}
    # per (pid, tid): (ts, -dur, name, correlation); name is None for runtime calls
    threads: dict[tuple[Any, Any], list[tuple[float, float, str | None, Any]]] = {}
    ext_names: dict[Any, str] = {}
    device: list[tuple[str, float, Any, Any]] = []

    for ev in events:
        if type(ev) is not dict:
            continue
        cat = ev.get("cat")
        kind = kinds.get(cat)
        if kind is None:
            kind = kinds[cat] = _classify(cat, host_cats)
        if kind == _SKIP or ev.get("ph") != "X":
            continue
        dur: Any = ev.get("dur")
        ts: Any = ev.get("ts")
        try:  # finite numbers only (rejects None, strings, NaN and infinities)
            if not (0.0 <= dur < _INF and -_INF < ts < _INF):
                continue
        except TypeError:
            continue
        args = ev.get("args")
        if type(args) is not dict:
            args = _NO_ARGS
        if kind == _HOST:
            name = ev.get("name")
            if type(name) is not str:
                name = _name_of(name)
            ext = args.get("External id")
            if ext is not None:
                ext_names[ext] = name
            key = (ev.get("pid"), ev.get("tid"))
            lst = threads.get(key)
            if lst is None:
                lst = threads[key] = []
            lst.append((ts, -dur, name, None))
        elif kind == _DEVICE:
            name = ev.get("name")
            if type(name) is not str:
                name = _name_of(name)
            device.append((name, dur, args.get("External id"), args.get("correlation")))
        else:
            corr = args.get("correlation")
            if corr is not None:
                key = (ev.get("pid"), ev.get("tid"))
                lst = threads.get(key)
                if lst is None:
                    lst = threads[key] = []
                lst.append((ts, -dur, None, corr))

    max_abs_ts = 0.0
    for lst in threads.values():
        lst.sort(key=_BY_START)
        max_abs_ts = max(max_abs_ts, abs(lst[0][0]), abs(lst[-1][0]))
    eps = max(_MIN_EPS_US, 4 * math.ulp(max_abs_ts))

    # name -> [calls, self cpu, total cpu, self device]
    acc: dict[str, list[float]] = {}
    launched_by: dict[Any, str] = {}  # runtime correlation -> innermost enclosing host op
    for lst in threads.values():
        _walk_thread(lst, eps, acc, launched_by)

    if device:
        _attribute_device(device, ext_names, launched_by, acc)

    stats = [OpStat(name, int(a[0]), a[1], a[2], a[3]) for name, a in acc.items()]
    stats.sort(key=lambda s: (-s.self_cpu_us, -s.self_device_us, s.name))
    return stats


def format_op_table(stats: Sequence[OpStat], *, row_limit: int = 50, title: str = "") -> str:
    """Render stats as a fixed-width text table in the style of torch's ``table()``.

    Rows are shown in the order given, at most ``row_limit`` of them (all if it is 0 or
    less). Percentages are of the sum of all ``stats``' self times, shown rows or not. The
    device columns appear only when some op has device time.
    """
    total_self_cpu = math.fsum(s.self_cpu_us for s in stats)
    total_self_device = math.fsum(s.self_device_us for s in stats)
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
        return _COLUMN_GAP.join(parts)

    rule = _COLUMN_GAP.join(["-" * name_width] + ["-" * w for w in widths])
    out: list[str] = []
    if title:
        out.append(title)
    out += [rule, line("Name", headers), rule]
    for s in rows:
        cells = [
            _format_share(s.self_cpu_us, total_self_cpu),
            _format_time(s.self_cpu_us),
            _format_time(s.total_cpu_us),
        ]
        if with_device:
            cells += [
                _format_time(s.self_device_us),
                _format_share(s.self_device_us, total_self_device),
            ]
        cells.append(str(s.calls))
        out.append(line(_truncate(s.name), cells))
    out.append(rule)
    out.append(f"Self CPU time total: {_format_time(total_self_cpu)}")
    if with_device:
        out.append(f"Self Device time total: {_format_time(total_self_device)}")
    return "\n".join(out) + "\n"


def build_op_table(trace_path: Path, *, row_limit: int = 50, title: str = "") -> str:
    """Load a trace, aggregate it and render the op table (see :func:`op_stats`).

    Raises:
        ValueError: the file is not a Chrome trace.
        OSError: the file cannot be opened.
    """
    trace = load_trace(trace_path)
    stats = op_stats(trace)
    logger.info("op table from %s: %d ops", trace_path, len(stats))
    return format_op_table(stats, row_limit=row_limit, title=title)


def _walk_thread(
    events: list[tuple[float, float, str | None, Any]],
    eps: float,
    acc: dict[str, list[float]],
    launched_by: dict[Any, str],
) -> None:
    """Nest one thread's events (sorted by start, longest first) and add their times to acc.

    An op's call, duration (as self and as total time) are added to its name's accumulator
    when it opens; its duration is taken off its parent's self time when it becomes a child.
    When an op closes with a single child sharing its accumulator (its name), torch's
    ``_remove_dup_nodes`` merges the two: self time is unchanged by that, only the child's
    call and inclusive time go away.
    """
    # open frames: [end, name, accumulator, number of children, first child's accumulator,
    # first child's duration]
    stack: list[list[Any]] = []
    for ts, neg_dur, name, corr in events:
        if name is None:  # a runtime call: only note which op it is inside
            while stack and ts >= stack[-1][0] - eps:
                frame = stack.pop()
                if frame[3] == 1 and frame[4] is frame[2]:
                    frame[2][0] -= 1
                    frame[2][2] -= frame[5]
            if stack:
                launched_by[corr] = stack[-1][1]
            continue
        dur = -neg_dur
        end = ts + dur
        a = acc.get(name)
        if a is None:
            a = acc[name] = [0.0, 0.0, 0.0, 0.0]
        a[0] += 1
        a[1] += dur
        a[2] += dur
        while stack:
            top = stack[-1]
            top_end = top[0]
            if ts >= top_end - eps or end > top_end + eps:
                stack.pop()
                if top[3] == 1 and top[4] is top[2]:
                    top[2][0] -= 1
                    top[2][2] -= top[5]
            else:
                top[2][1] -= dur
                top[3] += 1
                if top[3] == 1:
                    top[4] = a
                    top[5] = dur
                break
        stack.append([end, name, a, 0, None, 0.0])
    while stack:
        frame = stack.pop()
        if frame[3] == 1 and frame[4] is frame[2]:
            frame[2][0] -= 1
            frame[2][2] -= frame[5]


def _attribute_device(
    device: list[tuple[str, float, Any, Any]],
    ext_names: Mapping[Any, str],
    launched_by: Mapping[Any, str],
    acc: dict[str, list[float]],
) -> None:
    """Add device events' time to the op that launched them, or to a row of their own."""
    unattributed = 0
    for name, dur, ext, corr in device:
        target = ext_names.get(ext) if ext is not None and ext != 0 else None
        if target is None and corr is not None:
            target = launched_by.get(corr)
        if target is None:
            target = name
            unattributed += 1
            a = acc.get(target)
            if a is None:
                a = acc[target] = [0.0, 0.0, 0.0, 0.0]
            a[0] += 1
        else:
            a = acc.get(target)
            if a is None:  # cannot happen: every op in ext_names was walked; be safe anyway
                a = acc[target] = [0.0, 0.0, 0.0, 0.0]
        a[3] += dur
    if unattributed:
        logger.debug(
            "%d of %d device events could not be linked to a host op", unattributed, len(device)
        )


def _classify(cat: Any, host_cats: frozenset[str]) -> int:
    if not isinstance(cat, str):
        return _SKIP
    low = cat.lower()
    if low in host_cats:
        return _HOST
    if low in DEVICE_CATEGORIES:
        return _DEVICE
    if low in RUNTIME_CATEGORIES:
        return _RUNTIME
    return _SKIP


def _name_of(name: Any) -> str:
    """The row name for an event whose ``name`` is not a string."""
    return "<unnamed>" if name is None else str(name)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:5])
        return f"an object with keys {keys}" if keys else "an empty object"
    return type(value).__name__


def _truncate(name: str) -> str:
    if len(name) <= MAX_NAME_WIDTH:
        return name
    return name[: MAX_NAME_WIDTH - 3] + "..."


def _format_time(time_us: float) -> str:
    """Microseconds in torch's units: 1.234s, 1.234ms or 1.234us."""
    if abs(time_us) >= 1e6:
        return f"{time_us / 1e6:.3f}s"
    if abs(time_us) >= 1e3:
        return f"{time_us / 1e3:.3f}ms"
    return f"{time_us:.3f}us"


def _format_share(time_us: float, total_us: float) -> str:
    if total_us == 0:
        return "0.00%"
    return f"{time_us * 100.0 / total_us:.2f}%"
