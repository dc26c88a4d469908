"""Typed trace events, and the categories every part of the trace package agrees on.

A torch.profiler (Kineto) trace is a Chrome Trace Event Format object: a few top-level keys
(``baseTimeNanoseconds``, ``distributedInfo`` …) and a ``traceEvents`` list. Each event is
decoded into an :class:`Event`, a msgspec Struct: about a third of the memory of a dict and
decoded several times faster than ``json.loads`` (docs/traces.md has the measurements).

The categories are compared case-insensitively: older Kineto versions wrote ``Operator``,
``Kernel``, ``Memcpy`` and ``Memset``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec


class _Fields(msgspec.Struct, omit_defaults=True, gc=False):
    """The fields of a trace event that both kinds of events decode the same way."""

    ph: str = ""
    cat: str | None = None
    name: Any = None
    pid: Any = None
    tid: Any = None
    ts: float | None = None
    dur: float | None = None
    id: Any = None
    id2: Any = None
    bp: str | None = None
    s: str | None = None
    cname: str | None = None


class Event(_Fields, omit_defaults=True, gc=False):
    """One trace event. Fields a trace leaves out stay None and are not written back."""

    args: dict[str, Any] | None = None


NO_ARGS = msgspec.Raw(b"null")


class RawEvent(_Fields, omit_defaults=True, gc=False):
    """An :class:`Event` whose ``args`` stay undecoded JSON text (a third faster to read, and
    written back byte for byte). What the merge reads; :func:`links` gets what it needs."""

    args: msgspec.Raw = NO_ARGS


class _Links(msgspec.Struct):
    external_id: Any = msgspec.field(default=None, name="External id")
    correlation: Any = None


_LINKS = msgspec.json.Decoder(_Links)


def links(args: Any) -> tuple[int, int]:
    """An event's ``External id`` and ``correlation`` (-1 where absent), from either kind of
    args: a dict, or undecoded text."""
    if args is None or args is NO_ARGS:
        return -1, -1
    if type(args) is msgspec.Raw:
        try:
            found = _LINKS.decode(args)
        except msgspec.MsgspecError:
            return -1, -1
        return _ids(found.external_id, found.correlation)
    return _ids(args.get("External id"), args.get("correlation"))


def _ids(ext: Any, corr: Any) -> tuple[int, int]:
    """``External id`` and ``correlation`` as ints, -1 where absent or not an int."""
    return (ext if type(ext) is int else -1), (corr if type(corr) is int else -1)


def args_of(args: Any) -> dict[str, Any]:
    """An event's args as a dict, from either kind (empty when absent or not an object)."""
    if type(args) is msgspec.Raw:
        if args is NO_ARGS:
            return {}
        try:
            args = msgspec.json.decode(args)
        except msgspec.DecodeError:
            return {}
    return args if isinstance(args, dict) else {}


_LINKS_LIST = msgspec.json.Decoder(list[_Links | None])


def links_of(events: Sequence[Event | RawEvent]) -> list[tuple[int, int]]:
    """:func:`links` of many events: undecoded args are read in one call, not one each."""
    raws = [ev.args for ev in events if type(ev.args) is msgspec.Raw]
    if len(raws) != len(events):  # dict args (or a mix): one by one
        return [links(ev.args) for ev in events]
    try:
        found = _LINKS_LIST.decode(b"[" + b",".join(raws) + b"]")
    except msgspec.MsgspecError:
        return [links(ev.args) for ev in events]
    return [
        (-1, -1) if item is None else _ids(item.external_id, item.correlation) for item in found
    ]


class TraceError(ValueError):
    """A trace file that cannot be read: the message names the file and the problem."""


HOST_OP_CATEGORIES: frozenset[str] = frozenset({"cpu_op", "user_annotation", "operator"})
"""Host-side ops: the rows of an op table."""

DEVICE_CATEGORIES: frozenset[str] = frozenset(
    {"kernel", "gpu_memcpy", "gpu_memset", "memcpy", "memset"}
)
"""Device work: its time is the device time of the op that launched it."""

RUNTIME_CATEGORIES: frozenset[str] = frozenset(
    {"cuda_runtime", "cuda_driver", "runtime", "hip_runtime", "xpu_runtime", "privateuse1_runtime"}
)
"""Host-side launch calls: never rows, only the link from a device event to its op."""

KEPT_CATEGORIES: frozenset[str] = HOST_OP_CATEGORIES | DEVICE_CATEGORIES | RUNTIME_CATEGORIES
"""What slimming never drops: everything the op table counts or needs."""

FLOW_PHASES = frozenset({"s", "t", "f"})
PROCESS_META = frozenset({"process_name", "process_labels", "process_sort_index"})

SKIP, HOST, DEVICE, RUNTIME = 0, 1, 2, 3
"""What :func:`classify` says about a category."""

TRACE_SUFFIXES = (".pt.trace.json.gz", ".pt.trace.json")
SLIM_MARK = ".slim"
"""A slimmed copy is named like its original, with this before the suffix."""


def classify(cat: Any, host: frozenset[str] = HOST_OP_CATEGORIES) -> int:
    """HOST, DEVICE, RUNTIME or SKIP for an event's category."""
    if not isinstance(cat, str):
        return SKIP
    low = cat.lower()
    if low in host:
        return HOST
    if low in DEVICE_CATEGORIES:
        return DEVICE
    if low in RUNTIME_CATEGORIES:
        return RUNTIME
    return SKIP


def flow_key(ev: Event | RawEvent) -> tuple[str, str]:
    """What identifies a flow: its category and its id (``id``, else ``id2``)."""
    ident = ev.id if ev.id is not None else ev.id2
    return ev.cat or "", ident if type(ident) is str else repr(ident)


def hashable(value: Any) -> Any:
    """A pid or tid as a dict key (traces hold ints and strings; anything else by repr)."""
    return value if type(value) in (int, str, float) else repr(value)


def is_trace_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TRACE_SUFFIXES)


def strip_trace_suffix(name: str) -> str:
    for suffix in TRACE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def slim_copy_path(path: Path) -> Path:
    """A trace's slimmed copy: ``x.pt.trace.json[.gz]`` → ``x.slim.pt.trace.json.gz``.

    A slimmed copy's own path is returned unchanged.
    """
    stem = strip_trace_suffix(path.name)
    if stem.endswith(SLIM_MARK):
        return path
    return path.with_name(f"{stem}{SLIM_MARK}{TRACE_SUFFIXES[0]}")


def describe(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:5])
        return f"an object with keys {keys}" if keys else "an empty object"
    return type(value).__name__
