"""Smaller traces with the same op table: idle polling frames and short Python frames dropped.

vLLM's worker spins on a shared-memory queue while it waits for the scheduler. With
``torch_profiler_with_stack`` on, every turn of that loop is recorded: in a 5.7 s CPU profile
of two requests, 26,399 turns gave about 240,000 of the trace's 955,000 events. Short Python
frames (``<built-in function isinstance>`` …) are most of the rest.

The rule, chosen so that the op table cannot change:

* only complete events whose category the op table does not use may be dropped: never host
  ops, device events or runtime calls (:data:`~omnistage.traces.events.KEPT_CATEGORIES`).
  In practice that means Python frames (``python_function``);
* such an event is dropped when it is shorter than ``min_duration_us``, or when its name
  matches one of ``drop_patterns`` (:mod:`fnmatch` patterns, case-sensitive); the Python
  frames nested in a matched frame (its callees, by :func:`~omnistage.traces.nesting.parents`)
  go with it;
* metadata, instant, counter and flow events are kept; a flow whose start or end sat on a
  dropped frame, or that lacks a start or an end, is dropped whole.

The op table treats Python frames as transparent, so every op's calls, self time and total
time are exactly those of the full trace.

``strip_args`` (on by default) also removes bookkeeping that neither the op table nor the
viewers use: ``Record function id`` and ``Ev Idx`` from every event, and ``External id`` when
the trace has no device or runtime events and no ``ac2g`` flows (it links a kernel to its op).

A trace is read twice, as a stream both times: once to decide what goes, once to write the
copy. Only compact columns of the Python frames are held in between.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from omnistage.traces.events import (
    DEVICE_CATEGORIES,
    FLOW_PHASES,
    KEPT_CATEGORIES,
    RUNTIME_CATEGORIES,
    Event,
    RawEvent,
    flow_key,
    hashable,
)
from omnistage.traces.nesting import parents, sort_order, tolerance
from omnistage.traces.reader import TraceReader
from omnistage.traces.writer import TraceWriter
from omnistage.types import SizeSaving

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
calls, as they appear in its traces (0.32, CPU and CUDA alike). They are Python frames:
traces recorded without ``torch_profiler_with_stack: true`` have none."""

BOOKKEEPING_ARGS: tuple[str, ...] = ("Record function id", "Ev Idx")
_PHASE_BITS = {"s": 1, "t": 2, "f": 4}
LINK_ARG = "External id"
_LINK_CATEGORIES = DEVICE_CATEGORIES | RUNTIME_CATEGORIES


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
class SlimStats(SizeSaving):
    """What slimming removed. Byte counts are those of the files."""

    events_before: int
    events_after: int
    flow_events_dropped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    written: bool = True
    """False when no copy was written because it would not have been smaller."""
    args_removed: int = 0

    @property
    def events_dropped(self) -> int:
        return self.events_before - self.events_after

    @property
    def changed(self) -> bool:
        return bool(self.events_dropped or self.args_removed)

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


class _Plan:
    """What the first pass found: which events go, which flows are broken, which args go."""

    def __init__(self, options: SlimOptions) -> None:
        self.options = options
        self.match = _matcher(options.drop_patterns)
        self.events = 0
        self._th, self._idx = array("q"), array("q")
        self._ts, self._dur = array("d"), array("d")
        self._hit = array("b")
        self._kept_spots = array("q")  # hashes of where kept slices start
        self._threads: dict[tuple[Any, Any], int] = {}
        self._keys: list[tuple[Any, Any]] = []
        # flows, as hashes: a CUDA trace has millions (one per kernel launch and kernel)
        self._f_key, self._f_spot, self._f_phase = array("q"), array("q"), array("b")
        self.links_device = False
        self.drop: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)
        self.broken: set[int] = set()
        """Hashes of the flows dropped whole."""

    def scan(self, chunk: Sequence[Event | RawEvent]) -> None:
        for ev in chunk:
            i = self.events
            self.events += 1
            ph = ev.ph
            cat = ev.cat.lower() if isinstance(ev.cat, str) else ""
            if ph in FLOW_PHASES:
                self._f_key.append(hash(flow_key(ev)))
                self._f_spot.append(hash((hashable(ev.pid), hashable(ev.tid), ev.ts)))
                self._f_phase.append(_PHASE_BITS[ph])
                self.links_device = self.links_device or cat == "ac2g"
                continue
            if ph != "X":
                continue
            if cat in KEPT_CATEGORIES:
                self.links_device = self.links_device or cat in _LINK_CATEGORIES
                self._kept_spots.append(hash((hashable(ev.pid), hashable(ev.tid), ev.ts)))
                continue
            ts, dur = ev.ts, ev.dur
            if ts is None or dur is None:
                continue
            key = (hashable(ev.pid), hashable(ev.tid))
            th = self._threads.get(key)
            if th is None:
                th = self._threads[key] = len(self._keys)
                self._keys.append(key)
            self._th.append(th)
            self._idx.append(i)
            self._ts.append(ts)
            self._dur.append(dur)
            self._hit.append(self.match(ev.name if isinstance(ev.name, str) else ""))

    def decide(self) -> None:
        self.drop = np.zeros(self.events, dtype=bool)
        th = np.frombuffer(self._th, dtype=np.int64)
        if th.size:
            ts = np.frombuffer(self._ts, dtype=np.float64)
            dur = np.frombuffer(self._dur, dtype=np.float64)
            order = sort_order(th, ts, dur)
            th, ts, dur = th[order], ts[order], dur[order]
            hit = np.frombuffer(self._hit, dtype=np.int8)[order].tolist()
            parent = parents(th, ts, dur, eps=tolerance(float(np.max(np.abs(ts))))).tolist()
            subtree = [False] * len(hit)
            for i, p in enumerate(parent):
                subtree[i] = bool(hit[i]) or (p >= 0 and subtree[p])
            gone = np.array(subtree, dtype=bool) | (dur < self.options.min_duration_us)
            idx = np.frombuffer(self._idx, dtype=np.int64)[order]
            self.drop[idx[gone]] = True
        keys = np.frombuffer(self._f_key, dtype=np.int64)
        if not keys.size:
            return
        # a flow without a start or an end goes whole
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        seen = np.bitwise_or.reduceat(np.frombuffer(self._f_phase, dtype=np.int8)[order], starts)
        whole = _PHASE_BITS["s"] | _PHASE_BITS["f"]
        self.broken = set(sorted_keys[starts][(seen & whole) != whole].tolist())
        if th.size and gone.any():
            # so does a flow whose end sat on a dropped frame (and on no kept slice)
            lost = np.array(
                [
                    hash((*self._keys[t], start))
                    for t, start in zip(th[gone].tolist(), ts[gone].tolist(), strict=True)
                ],
                dtype=np.int64,
            )
            spots = np.frombuffer(self._f_spot, dtype=np.int64)
            kept = np.frombuffer(self._kept_spots, dtype=np.int64)
            lost = lost[np.isin(lost, spots) & ~np.isin(lost, kept)]
            if lost.size:
                self.broken.update(keys[np.isin(spots, lost)].tolist())

    def keep(self, ev: Event, i: int) -> bool:
        if self.drop[i]:
            return False
        return ev.ph not in FLOW_PHASES or hash(flow_key(ev)) not in self.broken


def slim_events(
    events: Sequence[Any], options: SlimOptions, *, in_place: bool = False
) -> tuple[list[dict[str, Any]], SlimStats]:
    """In-memory slimming of JSON data events (small traces, tests): what survives, in order.

    The same rule as :func:`slim_trace_file`; the result is plain JSON data again.
    """
    items = [ev for ev in events if type(ev) is dict]
    typed = [msgspec.convert(ev, Event) for ev in items]
    plan = _Plan(options)
    plan.scan(typed)
    plan.decide()
    strip = _stripped(options, plan)
    kept: list[dict[str, Any]] = []
    flows = removed = 0
    for i, (raw, ev) in enumerate(zip(items, typed, strict=True)):
        if not plan.keep(ev, i):
            flows += ev.ph in FLOW_PHASES
            continue
        args = raw.get("args")
        if isinstance(args, dict) and (slim := _without(args, strip)) is not None:
            removed += len(args) - len(slim)
            if in_place:
                raw["args"] = slim
            else:
                raw = {**raw, "args": slim}
        kept.append(raw)
    stats = SlimStats(len(events), len(kept), flow_events_dropped=flows, args_removed=removed)
    return kept, stats


def _without(args: dict[str, Any], strip: set[str]) -> dict[str, Any] | None:
    """``args`` less the ``strip`` keys; None when it has none of them (nothing to copy)."""
    if not strip or strip.isdisjoint(args):
        return None
    return {k: v for k, v in args.items() if k not in strip}


def _stripped(options: SlimOptions, plan: _Plan) -> set[str]:
    strip = set(BOOKKEEPING_ARGS) if options.strip_args else set()
    if options.strip_args and not plan.links_device:
        strip.add(LINK_ARG)
    return strip


def slim_trace_file(
    src: Path, dst: Path, options: SlimOptions, *, only_if_smaller: bool = False
) -> SlimStats:
    """Write a slimmed copy of the trace ``src`` (plain or gzipped) to ``dst``, gzipped.

    Every top-level key of the trace is kept, before the events. With ``only_if_smaller``,
    no copy is left when nothing was dropped or when the copy is not smaller than ``src``:
    ``dst`` is then removed and the stats say ``written=False``.

    Raises:
        TraceError: ``src`` is not a readable trace; ValueError: ``dst`` is ``src``.
        OSError: a file cannot be read or written.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"the slimmed copy of {src} cannot replace it: give another dst")
    plan = _Plan(options)
    # both passes decode alike (args as dicts): events are matched by their place, and an
    # event that only undecoded args would accept must not count in one pass and not the other
    with TraceReader(src, name=src.name) as reader:
        for chunk in reader.chunks():
            plan.scan(chunk)
        header = reader.header
    plan.decide()
    size = src.stat().st_size
    if only_if_smaller and not plan.drop.any() and not options.strip_args:
        dst.unlink(missing_ok=True)
        return SlimStats(
            plan.events, plan.events, bytes_before=size, bytes_after=size, written=False
        )
    kept, flows, removed = _write_kept(src, dst, header, plan, _stripped(options, plan))
    stats = SlimStats(
        plan.events,
        kept,
        flow_events_dropped=flows,
        bytes_before=size,
        bytes_after=dst.stat().st_size,
        args_removed=removed,
    )
    if only_if_smaller and (not stats.changed or stats.bytes_after >= size):
        dst.unlink()
        return replace(
            stats, events_after=stats.events_before, bytes_after=size, args_removed=0, written=False
        )
    logger.info(
        "slimmed %s: %d → %d events, %d → %d bytes",
        src.name,
        stats.events_before,
        stats.events_after,
        stats.bytes_before,
        stats.bytes_after,
    )
    return stats


def _write_kept(
    src: Path, dst: Path, header: dict[str, Any], plan: _Plan, strip: set[str]
) -> tuple[int, int, int]:
    """The second pass: write the events ``plan`` keeps, less the ``strip`` args, to ``dst``.
    Returns the events kept, the flow events dropped and the args removed."""
    kept = flows = removed = 0
    with TraceReader(src, name=src.name) as reader, TraceWriter(dst, header, tight=True) as writer:
        i = 0
        for chunk in reader.chunks():
            out = []
            for ev in chunk:
                if plan.keep(ev, i):
                    if ev.args and (slim := _without(ev.args, strip)) is not None:
                        removed += len(ev.args) - len(slim)
                        ev.args = slim
                    out.append(ev)
                elif ev.ph in FLOW_PHASES:
                    flows += 1
                i += 1
            kept += len(out)
            writer.write(out)
        writer.close()
    return kept, flows, removed


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
