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

from collections.abc import Iterable, Mapping
from typing import Any

from omnistage.traces.events import FLOW_PHASES, Event, hashable

SEQ_CLEARED = 1
SEQ_NEEDS_STATE = 2
_BEGIN, _END, _INSTANT = 1, 2, 3
_PACKET = b"\x0a"


def varint(value: int) -> bytes:
    """A protobuf varint (negative values as two's complement 64-bit, as protobuf does)."""
    if value < 0:
        value += 1 << 64
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


def _fixed64(value: int) -> bytes:
    return (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")


def packet(body: bytes) -> bytes:
    """One ``Trace.packet`` entry: a whole serialized TracePacket ready to append."""
    return _PACKET + varint(len(body)) + body


def track_descriptor(
    uuid: int,
    name: str,
    *,
    parent: int = 0,
    pid: int | None = None,
    rank: int | None = None,
    explicit_children: bool = False,
) -> bytes:
    """A TrackDescriptor packet: a process track when ``pid`` is given, else a named child."""
    body = b"\x08" + varint(uuid)
    if parent:
        body += b"\x28" + varint(parent)
    if pid is not None:
        proc = b"\x08" + varint(pid) + _len_field(b"\x32", name.encode())
        body += _len_field(b"\x1a", proc)
    else:
        body += _len_field(b"\x12", name.encode())
    if explicit_children:
        body += b"\x58\x03"  # child_ordering: EXPLICIT (by sibling_order_rank)
    if rank is not None:
        body += b"\x60" + varint(rank)
    return packet(_len_field(b"\xe2\x03", body))


ROOT_TRACK = 1 << 60
"""The uuid of the track that holds every process of the timeline, in pipeline order."""


def root_descriptor(name: str) -> bytes:
    return track_descriptor(ROOT_TRACK, name, explicit_children=True)


def _annotation(key: str, value: Any) -> bytes:
    body = _len_field(b"\x52", key.encode())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        body += _len_field(b"\x32", str(value).encode())
    elif isinstance(value, int):
        body += b"\x20" + varint(value)
    else:
        body += b"\x29" + _float64(value)
    return _len_field(b"\x22", body)


def _float64(value: float) -> bytes:
    import struct

    return struct.pack("<d", value)


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
        self._first = True
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
        self._bodies: dict[tuple[int, int, int], tuple[bytes, bytes]] = {}
        self._held: list[bytes] = []
        self._held_slices: dict[tuple[Any, Any, float], int] = {}
        self.unbound_flows = 0
        self.slices = 0

    # -- tracks ------------------------------------------------------------------------------

    def _track(self, pid: Any, tid: Any) -> int:
        key = (pid, hashable(tid))
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
        for rank, ((pid, tid), uuid) in enumerate(self._tracks.items()):
            name = self.thread_names.get((pid, tid)) or f"thread {tid}"
            out.append(track_descriptor(uuid, name, parent=self.process_tracks[pid], rank=rank))
        return b"".join(out)

    # -- events ------------------------------------------------------------------------------

    def _interned(self, table: dict[str, int], text: str, field: bytes, extra: list[bytes]) -> int:
        iid = table.get(text)
        if iid is None:
            iid = table[text] = len(table) + 1
            entry = b"\x08" + varint(iid) + _len_field(b"\x12", text.encode())
            extra.append(_len_field(field, entry))
        return iid

    def encode(self, events: Iterable[Event]) -> bytes:
        """Packets of the chunk before this one (this one is held back for flows)."""
        chunk: list[bytes] = []
        slices: dict[tuple[Any, Any, float], int] = {}
        bodies = self._bodies
        for ev in events:
            ph = ev.ph
            if ph == "X" or ph == "i" or ph == "I":
                ts = ev.ts
                if ts is None:
                    continue
                uuid = self._track(ev.pid, ev.tid)
                name = ev.name if type(ev.name) is str else str(ev.name)
                extra: list[bytes] = []
                n_iid = self._interned(self._names, name, b"\x12", extra)
                c_iid = self._interned(self._cats, ev.cat or "", b"\x0a", extra)
                start = round(ts * 1000)
                if ph != "X":
                    body = b"\x48\x03\x58" + varint(uuid) + b"\x50" + varint(n_iid)
                    body += b"\x18" + varint(c_iid)
                    chunk.append(self._packet(start, body, extra))
                    continue
                key = (uuid, n_iid, c_iid)
                pair = bodies.get(key)
                if pair is None:
                    begin = b"\x48\x01\x58" + varint(uuid) + b"\x50" + varint(n_iid)
                    pair = bodies[key] = (
                        begin + b"\x18" + varint(c_iid),
                        b"\x48\x02\x58" + varint(uuid),
                    )
                begin = pair[0]
                if self.annotate and ev.args:
                    begin += b"".join(_annotation(k, v) for k, v in ev.args.items())
                slices[(ev.pid, hashable(ev.tid), ts)] = len(chunk)
                if self.bind_inside:
                    where = (ev.pid, hashable(ev.tid))
                    self._spans.setdefault(where, []).append((ts, ts + (ev.dur or 0.0), len(chunk)))
                chunk.append(self._packet(start, begin, extra))
                chunk.append(self._packet(round((ts + (ev.dur or 0.0)) * 1000), pair[1], []))
                self.slices += 1
            elif ph in FLOW_PHASES:
                self._bind_flow(ev, chunk, slices)
            elif ph == "M":
                self._meta(ev)
        out = b"".join(self._held)
        self._held, self._held_slices = chunk, slices
        return out

    def finish(self) -> bytes:
        """The packets still held back."""
        out = b"".join(self._held)
        self._held, self._held_slices = [], {}
        return out

    def _packet(self, ts_ns: int, track_event: bytes, extra: list[bytes]) -> bytes:
        body = b"\x40" + varint(ts_ns) + b"\x5a" + varint(len(track_event)) + track_event
        if self._first:
            body += (
                b"\x50"
                + varint(self._sequence_id)
                + b"\x68"
                + varint(SEQ_CLEARED | SEQ_NEEDS_STATE)
            )
            self._first = False
        else:
            body += self.seq_tail
        if extra:
            body += _len_field(b"\x62", b"".join(extra))
        return _PACKET + varint(len(body)) + body

    def _bind_flow(
        self, ev: Event, chunk: list[bytes], slices: Mapping[tuple[Any, Any, float], int]
    ) -> None:
        ident = ev.id
        if type(ident) is not int or ev.ts is None:
            self.unbound_flows += 1
            return
        key = (ev.pid, hashable(ev.tid), ev.ts)
        field = b"\x81\x03" if ev.ph == "f" else b"\xf9\x02"
        at, target = slices.get(key), chunk
        if at is None and self.bind_inside:
            around = [
                (end - start, pos)
                for start, end, pos in self._spans.get(key[:2], [])
                if start <= ev.ts <= end
            ]
            at = min(around)[1] if around else None
        if at is None:
            at, target = self._held_slices.get(key), self._held
        if at is None:
            self.unbound_flows += 1
            return
        target[at] = _add_to_track_event(target[at], field + _fixed64(ident))

    def _meta(self, ev: Event) -> None:
        args = ev.args or {}
        if ev.name == "process_name":
            self.process_names[ev.pid] = str(args.get("name", ""))
        elif ev.name == "process_sort_index" and type(args.get("sort_index")) is int:
            self.process_ranks[ev.pid] = args["sort_index"]
        elif ev.name == "thread_name":
            self.thread_names[(ev.pid, hashable(ev.tid))] = str(args.get("name", ""))


def _add_to_track_event(entry: bytes, field: bytes) -> bytes:
    """A ``Trace.packet`` entry with ``field`` appended inside its TrackEvent."""
    body = _strip_len(entry[1:])
    # the packet starts with timestamp (0x40 varint), then the track event (0x5a len ...)
    pos = 1
    while body[pos] & 0x80:
        pos += 1
    pos += 1
    assert body[pos] == 0x5A
    size, after = _read_varint(body, pos + 1)
    event = body[after : after + size] + field
    body = body[: pos + 1] + varint(len(event)) + event + body[after + size :]
    return _PACKET + varint(len(body)) + body


def _strip_len(data: bytes) -> bytes:
    _, start = _read_varint(data, 0)
    return data[start:]


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
