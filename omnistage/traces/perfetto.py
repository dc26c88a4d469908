"""The merged timeline in Perfetto's own protobuf format (TrackEvent), written by hand.

Perfetto's UI reads JSON as a legacy format: it guesses which slice a flow arrow belongs to,
and it must parse every number from text. Its native format is a ``Trace`` protobuf message,
a sequence of ``TracePacket`` s. This module writes the packets directly as bytes (the wire
format is simple, and the generated classes of PyPI's ``perfetto`` package cost several µs
per message); tests read the result back with those classes, and the Perfetto UI opens it.

What is written, per trace event:

* a complete event (``X``): a ``TYPE_SLICE_BEGIN`` and a ``TYPE_SLICE_END`` packet on the
  track of its ``(pid, tid)``. Names and categories are interned (``InternedData``), so each
  string is written once per sequence;
* a flow (``s``/``t``/``f``): the id goes on the slice that starts at the flow event's exact
  ``(pid, tid, ts)`` — ``flow_ids`` on the first, ``terminating_flow_ids`` on the last — so
  each arrow is bound to its exact slices. A flow event with no slice starting there in its
  chunk or the one before is not written (counted in :attr:`ProtoEncoder.unbound_flows`);
* an instant (``i``/``I``): a ``TYPE_INSTANT`` packet;
* metadata names the tracks; counters (``C``) are not converted (the JSON timeline has them).

Tracks: one root track (``pipeline``), one per process under it, ranked by the stage's place
in the pipeline (``child_ordering: EXPLICIT`` and ``sibling_order_rank``: the UI would order
process groups by their slice count), and one per thread under its process, named as in the
JSON timeline. They are plain named tracks, not ``ProcessDescriptor`` s or
``ThreadDescriptor`` s: Kineto's GPU streams reuse small tids in every process, which
Perfetto would take for one thread moving between processes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from omnistage.traces.events import FLOW_PHASES, Event, args_of, hashable
from omnistage.traces.perfetto_wire import (
    PACKET,
    ROOT_TRACK,
    SEQ_CLEARED,
    SEQ_NEEDS_STATE,
    annotation,
    around,
    around_flow,
    fixed64,
    fixed_varints,
    len_field,
    track_descriptor,
    varint,
)


class ProtoEncoder:
    """Turns timeline events (already on the timeline's clock, µs) into TracePackets.

    One encoder is one packet sequence. Feed it chunks with :meth:`encode` (it returns the
    bytes of the chunk before: one chunk is held back so that flows can bind to slices just
    before them), then :meth:`finish` for the rest, and :meth:`descriptors` for the track
    descriptors, which must come first in the file.
    """

    def __init__(
        self, sequence_id: int, *, annotate: bool = False, bind_inside: bool = False
    ) -> None:
        self.seq_tail = b"\x50" + varint(sequence_id) + b"\x68" + varint(SEQ_NEEDS_STATE)
        self.unwritten = True
        """No packet of this sequence written yet: the first one clears the incremental state."""
        self._sequence_id = sequence_id
        self.annotate = annotate
        self.bind_inside = bind_inside
        """Bind a flow to the shortest slice of its track around it, not only to one starting
        exactly there (the orchestrator's arrows sit inside their ``handoff`` marks)."""
        self._spans: dict[tuple[Any, Any], list[tuple[float, float, int]]] = {}
        self._names: dict[str, int] = {}
        self._cats: dict[str, int] = {}
        self._tracks: dict[tuple[Any, Any], int] = {}
        self.process_tracks: dict[int, int] = {}
        self.process_names: dict[int, str] = {}
        self.process_ranks: dict[int, int] = {}
        self.thread_names: dict[tuple[Any, Any], str] = {}
        self._shapes: dict[tuple[int, int, int], _Shape] = {}
        self._known: dict[tuple[Any, Any, Any, Any], _Shape] = {}
        """(pid, tid, name, cat) → the slice's cached packet bytes."""
        self._held: _Chunk | None = None
        self.unbound_flows = 0

    # -- tracks ------------------------------------------------------------------------------

    def _track(self, pid: Any, tid: Any) -> int:
        """The uuid of a thread's track (``tid`` already hashable), new ones numbered."""
        key = (pid, tid)
        uuid = self._tracks.get(key)
        if uuid is None:
            uuid = self._tracks[key] = (self._sequence_id << 32) | (len(self._tracks) + 1)
            if pid not in self.process_tracks:
                self.process_tracks[pid] = (
                    (self._sequence_id << 32) | (1 << 31) | (len(self.process_tracks) + 1)
                )
        return uuid

    def descriptors(self, root: int = ROOT_TRACK) -> bytes:
        """Every track this encoder used, processes first, named from the metadata seen.

        Each process is a child of the ``root`` track (:func:`root_descriptor`), ranked by its
        place in the pipeline: the Perfetto UI orders top-level process groups by their slice
        count, but a track's children by rank.
        """
        out = []
        for pid, uuid in self.process_tracks.items():
            name = self.process_names.get(pid, f"pid {pid}")
            rank = self.process_ranks.get(pid)
            out.append(track_descriptor(uuid, name, parent=root, rank=rank, explicit_children=True))
        first: dict[tuple[Any, Any], int] = {}  # where each thread first appeared
        for pid, tid in self._tracks:
            first.setdefault((pid, _thread_of(tid)[0]), len(first))

        def place(item: tuple[tuple[Any, Any], int]) -> tuple[int, bool]:
            (pid, tid), _ = item
            thread, python = _thread_of(tid)
            return first[(pid, thread)], python

        order = sorted(self._tracks.items(), key=place)  # a thread's Python track after it
        for rank, ((pid, tid), uuid) in enumerate(order):
            thread, python = _thread_of(tid)
            name = self.thread_names.get((pid, thread)) or f"thread {thread}"
            name += " · Python" if python else ""
            out.append(track_descriptor(uuid, name, parent=self.process_tracks[pid], rank=rank))
        return b"".join(out)

    # -- events ------------------------------------------------------------------------------

    def _interned(self, table: dict[str, int], text: str, field: bytes, extra: list[bytes]) -> int:
        iid = table.get(text)
        if iid is None:
            iid = table[text] = len(table) + 1
            entry = b"\x08" + varint(iid) + len_field(b"\x12", text.encode())
            extra.append(len_field(field, entry))
        return iid

    def _shape(self, uuid: int, n_iid: int, c_iid: int) -> _Shape:
        """The constant bytes of a slice's two packets, cached per track, name and category."""
        key = (uuid, n_iid, c_iid)
        shape = self._shapes.get(key)
        if shape is None:
            begin = b"\x48\x01\x58" + varint(uuid) + b"\x50" + varint(n_iid)
            begin += b"\x18" + varint(c_iid)
            end = b"\x48\x02\x58" + varint(uuid)
            shape = self._shapes[key] = _Shape(
                begin,
                *around(begin, self.seq_tail),
                *around_flow(begin, self.seq_tail),
                *around(end, self.seq_tail),
            )
        return shape

    def encode(self, events: Iterable[Event]) -> bytes:
        """Packets of the chunk before this one (this one is held back for flows).

        The loop is the hot path of a report: a slice whose track, name and category were
        seen before costs a dict lookup and four appends.
        """
        chunk = _Chunk()
        ts_a, ends_a, shapes_a, slices = chunk.ts, chunk.ends, chunk.shapes, chunk.slices
        known = self._known
        plain = not (self.annotate or self.bind_inside)
        for ev in events:
            ph = ev.ph
            if ph == "X":
                ts = ev.ts
                if ts is None:
                    continue
                tid = ev.tid
                if type(tid) is not int and type(tid) is not str:
                    tid = hashable(tid)
                name = ev.name
                if type(name) is not str:
                    name = _text(name)
                key = (ev.pid, tid, name, ev.cat)
                shape = known.get(key) if plain else None
                at = len(ts_a)
                if shape is None:
                    shape = self._slice_shape(ev, key, chunk, at)
                ts_a.append(ts)
                ends_a.append(ts + (ev.dur or 0.0))
                shapes_a.append(shape)
                slices[(key[0], tid, ts)] = at
            elif ph in FLOW_PHASES:
                self._bind_flow(ev, chunk)
            elif ph == "i" or ph == "I":
                self._instant(ev, chunk)
            elif ph == "M":
                self._meta(ev)
        out = self._held.bytes(self) if self._held is not None else b""
        self._held = chunk
        return out

    def _slice_shape(
        self, ev: Event, key: tuple[Any, Any, Any, Any], chunk: _Chunk, at: int
    ) -> _Shape:
        """The cached bytes of a slice's packets; interns its strings the first time."""
        # Python frames get a track of their own beside their thread's ops: torch's traces
        # with stacks have record_function annotations that start inside one frame and end
        # inside another, and slices on one track must nest
        python = ev.cat == "python_function"
        uuid = self._track(ev.pid, (key[1], PYTHON) if python else key[1])
        extra: list[bytes] = []
        n_iid = self._interned(self._names, _text(ev.name), b"\x12", extra)
        c_iid = self._interned(self._cats, ev.cat or "", b"\x0a", extra)
        shape = self._shape(uuid, n_iid, c_iid)
        args = args_of(ev.args) if self.annotate else None
        if extra or args:
            body = shape.begin
            if args:
                body += b"".join(annotation(k, v) for k, v in args.items())
            chunk.odd.append((at, body, extra))
        if self.bind_inside:
            ts = ev.ts or 0.0
            self._spans.setdefault(key[:2], []).append((ts, ts + (ev.dur or 0.0), at))
        if not extra:
            self._known[key] = shape
        return shape

    def _instant(self, ev: Event, chunk: _Chunk) -> None:
        if ev.ts is None:
            return
        uuid = self._track(ev.pid, hashable(ev.tid))
        extra: list[bytes] = []
        n_iid = self._interned(self._names, _text(ev.name), b"\x12", extra)
        c_iid = self._interned(self._cats, ev.cat or "", b"\x0a", extra)
        body = b"\x48\x03\x58" + varint(uuid) + b"\x50" + varint(n_iid) + b"\x18" + varint(c_iid)
        chunk.odd.append((len(chunk.ts), body, extra))
        chunk.add(ev.ts, ev.ts, None)

    def finish(self) -> bytes:
        """The packets still held back."""
        out = self._held.bytes(self) if self._held is not None else b""
        self._held = None
        return out

    def packet_of(
        self, ts_ns: int, track_event: bytes, extra: list[bytes], *, first: bool
    ) -> bytes:
        """One packet, built field by field."""
        body = b"\x40" + varint(ts_ns) + b"\x5a" + varint(len(track_event)) + track_event
        if first:
            body += b"\x50" + varint(self._sequence_id)
            body += b"\x68" + varint(SEQ_CLEARED | SEQ_NEEDS_STATE)
        else:
            body += self.seq_tail
        if extra:
            body += len_field(b"\x62", b"".join(extra))
        return PACKET + varint(len(body)) + body

    def _bind_flow(self, ev: Event, chunk: _Chunk) -> None:
        ident = ev.id
        if type(ident) is not int or ev.ts is None:
            self.unbound_flows += 1
            return
        key = (ev.pid, hashable(ev.tid), ev.ts)
        field = (b"\x81\x03" if ev.ph == "f" else b"\xf9\x02") + fixed64(ident)
        at, target = chunk.slices.get(key), chunk
        if at is None and self.bind_inside:
            inside = [
                (end - start, pos)
                for start, end, pos in self._spans.get(key[:2], [])
                if start <= ev.ts <= end
            ]
            at = min(inside)[1] if inside else None
        if at is None and self._held is not None:
            at, target = self._held.slices.get(key), self._held
        if at is None:
            self.unbound_flows += 1
            return
        target.flows[at] = target.flows.get(at, b"") + field

    def _meta(self, ev: Event) -> None:
        args = args_of(ev.args)
        if ev.name == "process_name":
            self.process_names[ev.pid] = str(args.get("name", ""))
        elif ev.name == "process_sort_index" and type(args.get("sort_index")) is int:
            self.process_ranks[ev.pid] = args["sort_index"]
        elif ev.name == "thread_name":
            self.thread_names[(ev.pid, hashable(ev.tid))] = str(args.get("name", ""))


class _Shape(NamedTuple):
    """A slice's packets, less their timestamps: what :class:`_Chunk` joins around them."""

    begin: bytes
    """The begin packet's track event."""
    pre: bytes
    post: bytes
    flow_pre: bytes
    flow_post: bytes
    """The begin packet around a 10-byte flow field (``flow_post`` + flow + the tail)."""
    end_pre: bytes
    end_post: bytes


class _Chunk:
    """One chunk's packets, kept as columns until written (flows may still bind to them)."""

    def __init__(self) -> None:
        self.ts: list[float] = []
        self.ends: list[float] = []
        self.shapes: list[_Shape | None] = []
        self.slices: dict[tuple[Any, Any, float], int] = {}
        self.flows: dict[int, bytes] = {}
        self.odd: list[tuple[int, bytes, list[bytes]]] = []
        """Packets written the slow way: (position, track event body, interned data)."""

    def add(self, ts: float, end: float, shape: _Shape | None) -> None:
        self.ts.append(ts)
        self.ends.append(end)
        self.shapes.append(shape)

    def bytes(self, encoder: ProtoEncoder) -> bytes:
        """The chunk's packets. The fast path joins cached bytes around 8-byte timestamps that
        numpy wrote for the whole chunk; packets with flows, interned strings, args, or the
        sequence's first flags are built one by one."""
        if not self.ts:
            return b""
        starts = fixed_varints(np.rint(np.array(self.ts) * 1000).astype(np.int64))
        ends = fixed_varints(np.rint(np.array(self.ends) * 1000).astype(np.int64))
        odd = {pos: (body, extra) for pos, body, extra in self.odd}
        shape = self.shapes[0]
        if encoder.unwritten and 0 not in odd and shape is not None:
            odd[0] = (shape.begin, [])  # the sequence's first packet: built with its flags
        out: list[bytes] = []
        append = out.append
        flows = self.flows
        for i, shape in enumerate(self.shapes):
            lo = 8 * i
            special = odd.get(i)
            flow = flows.get(i) if flows else None
            if special is None and shape is not None and flow is None:
                append(shape.pre)
                append(starts[lo : lo + 8])
                append(shape.post)
            elif special is None and shape is not None and flow is not None and len(flow) == 10:
                append(shape.flow_pre)
                append(starts[lo : lo + 8])
                append(shape.flow_post)
                append(flow)
                append(encoder.seq_tail)
            else:
                if special is not None:
                    body, extra = special
                else:
                    assert shape is not None
                    body, extra = shape.begin, []
                body += flows.get(i, b"")
                first, encoder.unwritten = encoder.unwritten, False
                append(encoder.packet_of(round(self.ts[i] * 1000), body, extra, first=first))
            if shape is not None:
                append(shape.end_pre)
                append(ends[lo : lo + 8])
                append(shape.end_post)
        return b"".join(out)


PYTHON = "python"
"""Marks the track of a thread's Python frames."""


def _thread_of(tid: Any) -> tuple[Any, bool]:
    """A track's thread, and whether the track holds that thread's Python frames."""
    if type(tid) is tuple and tid[-1:] == (PYTHON,):
        return tid[0], True
    return tid, False


def _text(name: Any) -> str:
    return name if type(name) is str else str(name)
