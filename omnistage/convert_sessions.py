"""Conversions of the orchestrator's session messages: streamed stop progress and listings."""

from __future__ import annotations

from omnistage.convert import files_from_pb, files_to_pb, report_from_pb, report_to_pb
from omnistage.types import SessionList, SessionSummary, StopProgress
from omnistage.v1 import orchestrator_pb2


def progress_to_pb(event: StopProgress) -> orchestrator_pb2.StopProfileProgress:
    msg = orchestrator_pb2.StopProfileProgress(
        phase=event.phase,
        stage=event.stage,
        replica=event.replica,
        file=event.file,
        bytes_done=event.bytes_done,
        bytes_total=event.bytes_total,
        seconds=event.seconds,
        message=event.message,
    )
    if event.report is not None:
        msg.report.CopyFrom(report_to_pb(event.report))
    return msg


def progress_from_pb(msg: orchestrator_pb2.StopProfileProgress) -> StopProgress:
    return StopProgress(
        phase=msg.phase,
        stage=msg.stage,
        replica=msg.replica,
        file=msg.file,
        bytes_done=msg.bytes_done,
        bytes_total=msg.bytes_total,
        seconds=msg.seconds,
        message=msg.message,
        report=report_from_pb(msg.report) if msg.HasField("report") else None,
    )


def session_list_to_pb(listing: SessionList) -> orchestrator_pb2.SessionList:
    return orchestrator_pb2.SessionList(
        profile_root=listing.profile_root,
        max_sessions=listing.max_sessions,
        max_total_bytes=listing.max_total_bytes,
        sessions=[
            orchestrator_pb2.SessionSummary(
                session_id=s.session_id,
                path=s.path,
                modified_unix_ns=s.modified_unix_ns,
                total_bytes=s.total_bytes,
                files=files_to_pb(s.files),
            )
            for s in listing.sessions
        ],
    )


def session_list_from_pb(msg: orchestrator_pb2.SessionList) -> SessionList:
    return SessionList(
        profile_root=msg.profile_root,
        max_sessions=msg.max_sessions,
        max_total_bytes=msg.max_total_bytes,
        sessions=tuple(
            SessionSummary(
                session_id=s.session_id,
                path=s.path,
                modified_unix_ns=s.modified_unix_ns,
                total_bytes=s.total_bytes,
                files=files_from_pb(s.files),
            )
            for s in msg.sessions
        ),
    )
