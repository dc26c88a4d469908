"""Smaller traces with the same op table: idle polling frames and short Python frames dropped.

vLLM's worker spins on a shared-memory queue while it waits for the scheduler. With
``torch_profiler_with_stack`` on, every turn of that loop is recorded: in a 5.7 s CPU profile
of two requests, 26,399 turns gave about 240,000 of the trace's 955,000 events. Short Python
frames (``<built-in function isinstance>`` …) are most of the rest.

The rule, chosen so that the op table cannot change:

* only complete events (``"ph": "X"``) whose category is *not* counted by
  :func:`services.profiling.optable.op_stats` may be dropped: never host ops (``cpu_op``,
  ``user_annotation``), device events (kernels, memcpy, memset) or the runtime calls that link
  kernels to ops. In practice that means Python frames (``python_function``);
* such an event is dropped when it is shorter than ``min_duration_us``, or when its name
  matches one of ``drop_patterns`` (:mod:`fnmatch` patterns, case-sensitive); the Python frames
  nested in a matched frame (its callees, by time on the same thread) go with it;
* metadata, instant, counter and flow events are kept; a flow whose start or end was bound to
  a dropped frame, or that lacks a start or an end, is dropped whole.

``op_stats`` treats Python frames as transparent (a frame between two ops is not a child of
either), so every op's calls, self time and total time are exactly those of the full trace.
Dropping short ``cpu_op`` events instead would move their time into their parent's self time
and remove their rows: no threshold does that safely, so none is offered.

Traces recorded without Python stacks (``torch_profiler_with_stack: false``, vLLM's default)
have no frames to drop. What slimming can still remove from them is bookkeeping that neither
the op table nor the viewers use (``strip_args``, on by default):

* the per-event args ``Record function id`` and ``Ev Idx``, from every event;
* ``External id``, only when the trace has no device or runtime events (kernels, memcpy,
  memset, CUDA/HIP runtime and driver calls) and no ``ac2g`` flows: it links a kernel to its
  op, and nothing else reads it.

On a vLLM thinker trace without stacks this alone makes the copy 0.81 (with) and 0.61
(without ``External id``) of the original's size, with an identical op table.

This module also holds what the slimmed and the merged traces share: naming of slimmed copies,
flow checks, and :class:`TraceWriter`, which streams a trace into a gzip file.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from services.profiling.optable import (
    DEVICE_CATEGORIES,
    HOST_OP_CATEGORIES,
    RUNTIME_CATEGORIES,
    load_trace,
)

logger = logging.getLogger(__name__)

VLLM_IDLE_PATTERNS: tuple[str, ...] = (
    # the worker's spin-wait on vLLM's shared-memory broadcast queue (MessageQueue.acquire_read)
    "*/shm_broadcast.py(*): wait",
    "*/shm_broadcast.py(*): check",
    "*/shm_broadcast.py(*): memory_fence",
    "*/shm_broadcast.py(*): timeout_ms",
    "*/shm_broadcast.py(*): should_warn",
    "*/distributed/utils.py(*): sched_yield",
    "<built-in function sched_yield>",
    # blocking waits of the front end's event loop and of helper threads
    "selectors.py(*): select",
    "<built-in method poll of *>",
    "<built-in function sleep>",
    # tiny frames called by the ten thousand, in those loops and in every module call
    "torch/nn/modules/module.py(*): __getattr__",
    "<built-in method _get_tracing_state of *>",
    "<built-in function isinstance>",
    "<built-in function monotonic>",
    "<built-in method __exit__ of _thread.lock *>",
    "<built-in function getattr>",
)
"""Frames of vLLM's idle loops, and the tiny frames most frequent around them and in module
calls, as they appear in its traces (0.32, CPU and CUDA alike). On a 17.5 MB CPU trace with
stacks the idle loops alone give a copy of 0.76 of its size, the tiny frames bring it to 0.65;
the op table is the same. They are Python frames: traces recorded without
``torch_profiler_with_stack: true`` have none."""

BOOKKEEPING_ARGS: tuple[str, ...] = ("Record function id", "Ev Idx")
"""Per-event args removed by ``strip_args`` from every event."""
LINK_ARG = "External id"
"""Removed by ``strip_args`` only from traces with no device, runtime or ``ac2g`` events."""

KEPT_CATEGORIES: frozenset[str] = frozenset(
    c.lower() for c in HOST_OP_CATEGORIES | DEVICE_CATEGORIES | RUNTIME_CATEGORIES
)
"""Categories (lower case) never dropped: what the op table counts or needs."""

TRACE_SUFFIXES = (".pt.trace.json.gz", ".pt.trace.json")
SLIM_MARK = ".slim"
"""A slimmed copy is named like its original, with this before the suffix."""
FLOW_PHASES = frozenset({"s", "t", "f"})
GZIP_LEVEL = 6

_CHUNK_EVENTS = 20_000
_MIN_EPS_US = 5e-4


@dataclass(frozen=True)
class SlimOptions:
    """What to drop from a trace (see the module's docstring for what is never dropped)."""

    min_duration_us: float = 0.0
    """Python frames (and other uncounted events) shorter than this are dropped."""
    drop_patterns: tuple[str, ...] = VLLM_IDLE_PATTERNS
    """Frames whose name matches one of these, and the frames nested in them, are dropped."""
    strip_args: bool = True
    """Remove bookkeeping args that nothing reads (see the module's docstring)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_duration_us) and self.min_duration_us >= 0):
            raise ValueError(f"min_duration_us must be ≥ 0 (got {self.min_duration_us})")


@dataclass(frozen=True)
class SlimStats:
    """What slimming removed. Byte counts are those of the files, 0 for in-memory slimming."""

    events_before: int
    events_after: int
    flow_events_dropped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    written: bool = True
    """False when no copy was written because it would not have been smaller."""
    args_removed: int = 0
    """How many per-event args ``strip_args`` removed."""

    @property
    def events_dropped(self) -> int:
        return self.events_before - self.events_after

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    @property
    def size_ratio(self) -> float:
        """Slimmed size over full size (1.0 when there were no bytes)."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    @classmethod
    def total(cls, stats: Iterable[SlimStats]) -> SlimStats:
        items = list(stats)
        return cls(
            events_before=sum(s.events_before for s in items),
            events_after=sum(s.events_after for s in items),
            flow_events_dropped=sum(s.flow_events_dropped for s in items),
            bytes_before=sum(s.bytes_before for s in items),
            bytes_after=sum(s.bytes_after for s in items),
            args_removed=sum(s.args_removed for s in items),
        )

    @property
    def changed(self) -> bool:
        """Whether slimming removed anything: events or args."""
        return bool(self.events_dropped or self.args_removed)


def slim_events(
    events: Sequence[Any], options: SlimOptions, *, in_place: bool = False
) -> tuple[list[dict[str, Any]], SlimStats]:
    """The events that survive ``options``, in their original order, and what was dropped.

    Args are stripped from copies of the events, unless ``in_place`` allows changing them.
    """
    match = _matcher(options.drop_patterns)
    threads: dict[tuple[Any, Any], list[tuple[float, float, int]]] = {}
    for index, ev in enumerate(events):
        if type(ev) is not dict or ev.get("ph") != "X":
            continue
        cat = ev.get("cat")
        if isinstance(cat, str) and cat.lower() in KEPT_CATEGORIES:
            continue
        ts, dur = ev.get("ts"), ev.get("dur")
        if isinstance(ts, (int, float)) and isinstance(dur, (int, float)):
            key = (_hashable(ev.get("pid")), _hashable(ev.get("tid")))
            threads.setdefault(key, []).append((ts, -dur, index))

    dropped: set[int] = set()
    for items in threads.values():
        items.sort()
        eps = max(_MIN_EPS_US, 4 * math.ulp(max(abs(items[0][0]), abs(items[-1][0]))))
        stack: list[tuple[float, bool]] = []  # (end, callees are dropped too)
        for ts, neg_dur, index in items:
            end = ts - neg_dur
            while stack and (ts >= stack[-1][0] - eps or end > stack[-1][0] + eps):
                stack.pop()
            name = events[index].get("name")
            subtree = bool(stack and stack[-1][1]) or match(name if isinstance(name, str) else "")
            if subtree or -neg_dur < options.min_duration_us:
                dropped.add(index)
            stack.append((end, subtree))

    kept = [ev for i, ev in enumerate(events) if type(ev) is dict and i not in dropped]
    flows_before = sum(1 for ev in kept if ev.get("ph") in FLOW_PHASES)
    if flows_before and dropped:
        kept = _unbind_flows(kept, [events[i] for i in dropped])
    kept, _ = drop_incomplete_flows(kept)
    flows_after = sum(1 for ev in kept if ev.get("ph") in FLOW_PHASES)
    removed = 0
    if options.strip_args:
        kept, removed = strip_args(kept, in_place=in_place)
    stats = SlimStats(
        len(events),
        len(kept),
        flow_events_dropped=flows_before - flows_after,
        args_removed=removed,
    )
    return kept, stats


def strip_args(
    events: list[dict[str, Any]], *, in_place: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """The events without bookkeeping args (see the module's docstring), and how many went.

    ``External id`` goes too when no event links host ops to device work (device or runtime
    categories, ``ac2g`` flows). Events are copied where they change, unless ``in_place``.
    """
    keys = set(BOOKKEEPING_ARGS)
    if not any(_links_device(ev) for ev in events):
        keys.add(LINK_ARG)
    out = events if in_place else list(events)
    removed = 0
    for i, ev in enumerate(out):
        args = ev.get("args")
        if type(args) is not dict or keys.isdisjoint(args):
            continue
        slim = {k: v for k, v in args.items() if k not in keys}
        removed += len(args) - len(slim)
        if in_place:
            ev["args"] = slim
        else:
            out[i] = {**ev, "args": slim}
    return out, removed


def slim_trace_file(
    src: Path, dst: Path, options: SlimOptions, *, only_if_smaller: bool = False
) -> SlimStats:
    """Write a slimmed copy of the trace ``src`` (plain or gzipped) to ``dst`` as gzipped JSON.

    Every top-level key of the trace (``baseTimeNanoseconds``, ``distributedInfo`` …) is kept.
    With ``only_if_smaller``, no copy is left when nothing was dropped or when the copy is not
    smaller than ``src`` (torch gzips at level 9, this module at 6): ``dst`` is then removed
    and the stats say ``written=False``, with the original's size as the size after.

    Raises:
        ValueError: ``src`` is not a trace, or ``dst`` is ``src``.
        OSError: a file cannot be read or written.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"the slimmed copy of {src} cannot replace it: give another dst")
    trace = load_trace(src)
    kept, stats = slim_events(trace["traceEvents"], options, in_place=True)
    size = src.stat().st_size
    if only_if_smaller and not stats.changed:
        dst.unlink(missing_ok=True)
        return replace(stats, bytes_before=size, bytes_after=size, written=False)
    with TraceWriter(dst) as writer:
        writer.write(kept)
        writer.close(trace)
    result = replace(stats, bytes_before=size, bytes_after=dst.stat().st_size)
    if only_if_smaller and result.bytes_after >= size:
        dst.unlink()
        return replace(
            result,
            events_after=result.events_before,
            bytes_after=size,
            args_removed=0,
            written=False,
        )
    logger.info(
        "slimmed %s: %d → %d events, %d → %d bytes",
        src.name,
        result.events_before,
        result.events_after,
        result.bytes_before,
        result.bytes_after,
    )
    return result


def slim_copy_path(path: Path) -> Path:
    """A trace's slimmed copy: ``x.pt.trace.json[.gz]`` → ``x.slim.pt.trace.json.gz``.

    A slimmed copy's own path is returned unchanged.
    """
    stem = strip_trace_suffix(path.name)
    if stem.endswith(SLIM_MARK):
        return path
    return path.with_name(f"{stem}{SLIM_MARK}{TRACE_SUFFIXES[0]}")


def strip_trace_suffix(name: str) -> str:
    for suffix in TRACE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def drop_incomplete_flows(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The events less the flow events (``s``/``t``/``f``) of flows without a start or an end.

    Flows are told apart by ``(cat, id)``. Returns the events and how many were dropped.
    """
    phases: dict[tuple[str, str], set[str]] = {}
    for ev in events:
        if ev.get("ph") in FLOW_PHASES:
            phases.setdefault(flow_key(ev), set()).add(ev["ph"])
    broken = {key for key, seen in phases.items() if not {"s", "f"} <= seen}
    if not broken:
        return events, 0
    kept = [e for e in events if e.get("ph") not in FLOW_PHASES or flow_key(e) not in broken]
    return kept, len(events) - len(kept)


def flow_key(ev: Mapping[str, Any]) -> tuple[str, str]:
    """What identifies a flow: its category and its id (``id``, else ``id2``)."""
    ident = ev["id"] if "id" in ev else ev.get("id2")
    return str(ev.get("cat", "")), ident if type(ident) is str else repr(ident)


class TraceWriter:
    """Streams one Trace Event Format object (compact JSON) into a gzip file, in chunks.

    It writes ``<name>.tmp`` and moves it into place on :meth:`close`; if the ``with`` block
    fails, the temporary file is removed and nothing is left behind.
    """

    def __init__(self, path: Path, *, compresslevel: int = GZIP_LEVEL) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._fh = gzip.open(self._tmp, "wb", compresslevel=compresslevel)  # noqa: SIM115
        self._fh.write(b'{"traceEvents":[')
        self._empty = True
        self.events = 0

    def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        for start in range(0, len(events), _CHUNK_EVENTS):
            chunk = list(events[start : start + _CHUNK_EVENTS])
            if chunk:
                text = _dumps(chunk)[1:-1]
                self._fh.write(text if self._empty else b"," + text)
                self._empty = False
                self.events += len(chunk)

    def close(self, top_level: Mapping[str, Any]) -> Path:
        """Add the other top-level keys (``traceEvents`` is skipped), finish, move into place."""
        self._fh.write(b"]")
        for key, value in top_level.items():
            if key != "traceEvents":
                self._fh.write(b",%s:%s" % (_dumps(key), _dumps(value)))
        self._fh.write(b"}")
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self.path

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None or not self._fh.closed:
            self._fh.close()
            self._tmp.unlink(missing_ok=True)


def _unbind_flows(kept: list[dict[str, Any]], gone: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop flow events that sat at the start of a dropped frame and of no kept slice."""
    spots = {(_hashable(e.get("pid")), _hashable(e.get("tid")), e.get("ts")) for e in gone}
    for ev in kept:
        if ev.get("ph") == "X":
            spots.discard((_hashable(ev.get("pid")), _hashable(ev.get("tid")), ev.get("ts")))
    if not spots:
        return kept
    return [
        ev
        for ev in kept
        if ev.get("ph") not in FLOW_PHASES
        or (_hashable(ev.get("pid")), _hashable(ev.get("tid")), ev.get("ts")) not in spots
    ]


_LINK_CATEGORIES = frozenset(c.lower() for c in DEVICE_CATEGORIES | RUNTIME_CATEGORIES)


def _links_device(ev: Mapping[str, Any]) -> bool:
    cat = ev.get("cat")
    if not isinstance(cat, str):
        return False
    low = cat.lower()
    return low in _LINK_CATEGORIES or (low == "ac2g" and ev.get("ph") in FLOW_PHASES)


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    if not patterns:
        return lambda _name: False
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    cache: dict[str, bool] = {}

    def match(name: str) -> bool:
        hit = cache.get(name)
        if hit is None:
            hit = cache[name] = regex.match(name) is not None
        return hit

    return match


def _hashable(value: Any) -> Any:
    return value if type(value) in (int, str, float) else repr(value)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
