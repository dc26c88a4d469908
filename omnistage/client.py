"""The Python client of an omnistage pipeline, in asyncio and sync forms.

    import omnistage
    client = omnistage.Client("localhost:50050")
    client.start_profile(stages=[0, 2])
    for out in client.generate("What is the capital of France?", max_tokens=32):
        print(out.stage, out.text)
    report = client.stop_profile(download_to="profiles")  # the whole session, on this disk

`AsyncClient` is the implementation; `Client` runs it on a private event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc

from omnistage.client_base import AsyncRpcClient, SyncRpcClient
from omnistage.convert import (
    pipeline_output_from_pb,
    pipeline_status_from_pb,
    report_from_pb,
    sampling_to_pb,
)
from omnistage.convert_sessions import progress_from_pb, session_list_from_pb
from omnistage.download import RESUME_FOR_S, FileProgressFn, download_session
from omnistage.errors import NotFoundError, OmnistageError
from omnistage.security import ClientSecurity
from omnistage.stage_client import AsyncStageClient, StageClient, make_request
from omnistage.trace_context import outgoing_metadata
from omnistage.types import (
    ChatTurn,
    PipelineOutput,
    PipelineStatus,
    ProfileReport,
    SamplingOptions,
    SessionList,
    SessionSummary,
    StopProgress,
)
from omnistage.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

__all__ = ["AsyncClient", "AsyncStageClient", "Client", "ClientSecurity", "StageClient"]
__all__ += ["make_request"]  # the stage client's, re-exported for scripts that use both

T = TypeVar("T")
STOP_TIMEOUT_S = 900.0  # stopping profiles waits for every stage's flush and the file pulls
FETCH_TIMEOUT_S = 3600.0  # one file; a cut link is found by keepalive pings within ~10 s


def _sampling(options: Mapping[str, Any] | SamplingOptions | None) -> SamplingOptions:
    if options is None:
        return SamplingOptions()
    if isinstance(options, SamplingOptions):
        return options
    values = dict(options)
    if "stop" in values:
        values["stop"] = tuple(values["stop"] or ())
    return SamplingOptions(**values)


class AsyncClient(AsyncRpcClient):
    """Talks to an orchestrator with grpc.aio; `security` sets TLS, mTLS and the token
    (`token=` alone is the shorthand for a token over plaintext)."""

    default_address = "localhost:50050"

    def _connected(self, channel: grpc.aio.Channel) -> None:
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(channel)

    async def generate(
        self,
        prompt: str = "",
        *,
        messages: Sequence[Mapping[str, str] | ChatTurn] = (),
        token_ids: Sequence[int] = (),
        stage_sampling: Mapping[str, Mapping[str, Any] | SamplingOptions] | None = None,
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncIterator[PipelineOutput]:
        """Stream every stage's output (or the final stage's, as the pipeline file says).

        Sampling keywords (max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        apply to every stage; `stage_sampling` overrides them per stage name. When an
        OpenTelemetry span is current, its context goes with the call (`traceparent`), so the
        orchestrator's and the stages' spans join the caller's trace.
        """
        turns = [m if isinstance(m, ChatTurn) else ChatTurn(**m) for m in messages]
        request = orchestrator_pb2.PipelineRequest(
            request_id=request_id,
            prompt=prompt,
            token_ids=list(token_ids),
            messages=[common_pb2.ChatMessage(role=t.role, content=t.content) for t in turns],
            sampling=sampling_to_pb(_sampling(sampling)),
        )
        for name, options in (stage_sampling or {}).items():
            request.stage_sampling[name].CopyFrom(sampling_to_pb(_sampling(options)))
        metadata = outgoing_metadata() or None
        call = self._stub.Generate(request, timeout=timeout, metadata=metadata)
        with self._errors(call):
            async for msg in call:
                yield pipeline_output_from_pb(msg)

    async def start_profile(
        self,
        stages: Sequence[str | int] | None = None,
        *,
        label: str = "",
        delay_iterations: int = 0,
        max_iterations: int = 0,
        timing_only: bool = False,
    ) -> str:
        """Profile the given stages (names or indices; None means all). Returns the session id.

        `timing_only` records each request's spans, its stages' own times and the clocks, and
        starts no stage's torch profiler; `stop_profile` then writes the report, summary.md
        and the critical paths, and pulls no trace."""
        request = orchestrator_pb2.PipelineStartProfileRequest(
            stages=[str(s) for s in stages or ()],
            label=label,
            delay_iterations=delay_iterations,
            max_iterations=max_iterations,
            timing_only=timing_only,
        )
        reply = await self._call(self._stub.StartProfile(request, timeout=300))
        return str(reply.session_id)

    async def stop_profile(
        self,
        output_dir: str = "",
        *,
        stages: Sequence[str | int] | None = None,
        slim: bool = False,
        slim_min_duration_us: float = 0.0,
        slim_patterns: Sequence[str] = (),
        timeout: float = STOP_TIMEOUT_S,
        progress: Callable[[StopProgress], None] | None = None,
        download_to: str | Path | None = None,
        file_progress: FileProgressFn | None = None,
    ) -> ProfileReport:
        """Stop profiling; every stage's files land in `<output_dir>/<session>/<stage>/` on
        the orchestrator, with `timeline.json.gz` (all stages on one clock) and `summary.md`.

        `output_dir` is relative to the orchestrator's profile root; empty means the root.
        `slim` also writes slimmed copies of the traces (vLLM's idle loops and, with
        `slim_min_duration_us`, short Python frames dropped) and builds the timeline from them.
        `progress` gets each step as it happens (stages flushing, files pulled, merging).
        `download_to` brings the whole session to this machine, into `<download_to>/<session>/`
        (each file's sha256 checked; `file_progress` gets each file's bytes as they arrive).
        """
        request = orchestrator_pb2.PipelineStopProfileRequest(
            stages=[str(s) for s in stages or ()],
            output_dir=output_dir,
            slim=slim,
            slim_min_duration_us=slim_min_duration_us,
            slim_patterns=list(slim_patterns),
        )
        if progress is None and download_to is None:
            return report_from_pb(
                await self._call(self._stub.StopProfile(request, timeout=timeout))
            )
        report = await self._stop_streamed(request, timeout, progress)
        if download_to is None:
            return report
        summary = SessionSummary(report.session_id, "", 0, 0, report.session_files)
        folder = await download_session(
            self._file_chunks, summary, Path(download_to), progress=file_progress
        )
        return replace(report, downloaded_to=str(folder))

    async def _stop_streamed(
        self,
        request: orchestrator_pb2.PipelineStopProfileRequest,
        timeout: float,
        progress: Callable[[StopProgress], None] | None,
    ) -> ProfileReport:
        call = self._stub.StopProfileStream(request, timeout=timeout)
        report = None
        with self._errors(call):
            async for msg in call:
                event = progress_from_pb(msg)
                if progress is not None:
                    progress(event)
                report = event.report or report
        if report is None:
            raise OmnistageError("the orchestrator ended StopProfileStream without a report")
        return report

    async def sessions(self) -> SessionList:
        """The sessions the orchestrator keeps, newest first, each with its files."""
        request = orchestrator_pb2.ListSessionsRequest()
        return session_list_from_pb(await self._call(self._stub.ListSessions(request, timeout=60)))

    async def fetch_session(
        self,
        session_id: str,
        to: str | Path,
        *,
        progress: FileProgressFn | None = None,
        resume_for_s: float = RESUME_FOR_S,
    ) -> Path:
        """Download a kept session into `<to>/<session_id>/`; return that folder.

        Each file's sha256 is checked; a cut download resumes where it stopped, in this call
        or the next."""
        listing = await self.sessions()
        found = [s for s in listing.sessions if s.session_id == session_id]
        if not found:
            kept = ", ".join(s.session_id for s in listing.sessions[:5]) or "none"
            raise NotFoundError(
                f"the orchestrator keeps no session {session_id!r} (newest kept: {kept})"
            )
        return await download_session(
            self._file_chunks, found[0], Path(to), progress=progress, resume_for_s=resume_for_s
        )

    async def _file_chunks(
        self, session_id: str, name: str, offset: int
    ) -> AsyncIterator[tuple[int, bytes, int]]:
        request = orchestrator_pb2.FetchSessionFileRequest(
            session_id=session_id, name=name, offset=offset
        )
        call = self._stub.FetchSessionFile(request, timeout=FETCH_TIMEOUT_S)
        with self._errors(call):
            async for chunk in call:
                yield chunk.offset, chunk.data, chunk.total_size

    async def delete_session(self, session_id: str) -> int:
        """Delete a kept session on the orchestrator; return the bytes freed."""
        request = orchestrator_pb2.DeleteSessionRequest(session_id=session_id)
        reply = await self._call(self._stub.DeleteSession(request, timeout=60))
        return int(reply.bytes_freed)

    async def pipeline(self) -> PipelineStatus:
        """Every stage's addresses, health and profiling state."""
        request = orchestrator_pb2.GetPipelineRequest()
        reply = await self._call(self._stub.GetPipeline(request, timeout=30))
        return pipeline_status_from_pb(reply)


class Client(SyncRpcClient[AsyncClient]):
    """The synchronous face of `AsyncClient`."""

    async_class = AsyncClient

    def generate(self, prompt: str = "", **kwargs: Any) -> Iterator[PipelineOutput]:
        return self._loop.iterate(self._async.generate(prompt, **kwargs))

    def start_profile(self, stages: Sequence[str | int] | None = None, **kwargs: Any) -> str:
        return self._loop.run(self._async.start_profile(stages, **kwargs))

    def stop_profile(self, output_dir: str = "", **kwargs: Any) -> ProfileReport:
        return self._loop.run(self._async.stop_profile(output_dir, **kwargs))

    def pipeline(self) -> PipelineStatus:
        return self._loop.run(self._async.pipeline())

    def sessions(self) -> SessionList:
        return self._loop.run(self._async.sessions())

    def fetch_session(self, session_id: str, to: str | Path, **kwargs: Any) -> Path:
        return self._loop.run(self._async.fetch_session(session_id, to, **kwargs))

    def delete_session(self, session_id: str) -> int:
        return self._loop.run(self._async.delete_session(session_id))
