"""Perfetto's protobuf wire format, the few pieces the timeline needs, written by hand.

Varints, length-delimited fields, and whole packets: a ``Trace`` is a sequence of
``packet = 1`` entries, each a serialized ``TracePacket``. Field numbers are those of
Perfetto's protos (PyPI's ``perfetto`` package ships them; the tests read our bytes back with
its generated classes).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

SEQ_CLEARED = 1
SEQ_NEEDS_STATE = 2
PACKET = b"\x0a"


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


def len_field(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


def fixed64(value: int) -> bytes:
    return (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")


def packet(body: bytes) -> bytes:
    """One ``Trace.packet`` entry: a whole serialized TracePacket ready to append."""
    return PACKET + varint(len(body)) + body


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
        proc = b"\x08" + varint(pid) + len_field(b"\x32", name.encode())
        body += len_field(b"\x1a", proc)
    else:
        body += len_field(b"\x12", name.encode())
    if explicit_children:
        body += b"\x58\x03"  # child_ordering: EXPLICIT (by sibling_order_rank)
    if rank is not None:
        body += b"\x60" + varint(rank)
    return packet(len_field(b"\xe2\x03", body))


ROOT_TRACK = 1 << 60
"""The uuid of the track that holds every process of the timeline, in pipeline order."""


def root_descriptor(name: str) -> bytes:
    return track_descriptor(ROOT_TRACK, name, explicit_children=True)


def annotation(key: str, value: Any) -> bytes:
    body = len_field(b"\x52", key.encode())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        body += len_field(b"\x32", str(value).encode())
    elif isinstance(value, int):
        body += b"\x20" + varint(value)
    else:
        body += b"\x29" + float64(value)
    return len_field(b"\x22", body)


def float64(value: float) -> bytes:
    return struct.pack("<d", value)


def fixed_varints(values: npt.NDArray[np.int64]) -> bytes:
    """Each value (0 ≤ v < 2**56) as an 8-byte varint, padded: protobuf parsers accept
    varints longer than they need, and a fixed width lets numpy write them all at once."""
    v = values.astype(np.uint64)
    out = np.empty((v.size, 8), dtype=np.uint8)
    for k in range(8):
        group = (v >> np.uint64(7 * k)) & np.uint64(0x7F)
        out[:, k] = group | np.uint64(0x80 if k < 7 else 0)
    return out.tobytes()


def around(body: bytes, tail: bytes) -> tuple[bytes, bytes]:
    """A packet with ``body`` as its track event, cut around its 8-byte timestamp."""
    inner = b"\x5a" + varint(len(body)) + body + tail
    size = 1 + 8 + len(inner)
    return PACKET + varint(size) + b"\x40", inner


def around_flow(body: bytes, tail: bytes) -> tuple[bytes, bytes]:
    """:func:`around`, with room for one 10-byte flow field at the end of the track event:
    the packet is ``pre + timestamp + post + flow + tail``."""
    post = b"\x5a" + varint(len(body) + 10) + body
    size = 1 + 8 + len(post) + 10 + len(tail)
    return PACKET + varint(size) + b"\x40", post
