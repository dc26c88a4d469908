"""Conversions of the session messages: streamed stop progress, listings and file chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from omnistage.convert import (
    fields_of,
    files_from_pb,
    files_to_pb,
    from_fields,
    report_from_pb,
    report_to_pb,
)
from omnistage.types import SessionList, SessionSummary, StopProgress
from omnistage.v1 import common_pb2, orchestrator_pb2


def progress_to_pb(event: StopProgress) -> orchestrator_pb2.StopProfileProgress:
    msg = orchestrator_pb2.StopProfileProgress(**fields_of(event, leave=("report",)))
    if event.report is not None:
        msg.report.CopyFrom(report_to_pb(event.report))
    return msg


def progress_from_pb(msg: orchestrator_pb2.StopProfileProgress) -> StopProgress:
    report = report_from_pb(msg.report) if msg.HasField("report") else None
    return from_fields(msg, StopProgress, report=report)


def session_list_to_pb(listing: SessionList) -> orchestrator_pb2.SessionList:
    sessions = [
        orchestrator_pb2.SessionSummary(**fields_of(s, files=files_to_pb(s.files)))
        for s in listing.sessions
    ]
    return orchestrator_pb2.SessionList(**fields_of(listing, sessions=sessions))


def session_list_from_pb(msg: orchestrator_pb2.SessionList) -> SessionList:
    sessions = tuple(
        from_fields(s, SessionSummary, files=files_from_pb(s.files)) for s in msg.sessions
    )
    return from_fields(msg, SessionList, sessions=sessions)


async def file_chunks_to_pb(
    read_chunks: Callable[..., AsyncIterator[tuple[int, bytes, int]]], request: Any
) -> AsyncIterator[common_pb2.FileChunk]:
    """A Fetch*File request served from a session store's `read_chunks`."""
    chunks = read_chunks(
        request.session_id, request.name, chunk_size=request.chunk_size, offset=request.offset
    )
    async for offset, data, total in chunks:
        yield common_pb2.FileChunk(data=data, offset=offset, total_size=total)
