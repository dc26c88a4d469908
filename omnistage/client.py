"""The Python client of an omnistage pipeline, in asyncio and sync forms.

    import omnistage
    client = omnistage.Client("localhost:50050")
    client.start_profile(stages=[0, 2])
    for out in client.generate("What is the capital of France?", max_tokens=32):
        print(out.stage, out.text)
    report = client.stop_profile("profiles")

`AsyncClient` is the implementation; `Client` runs it on a private event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc

from omnistage.convert import (
    pipeline_output_from_pb,
    report_from_pb,
    sampling_to_pb,
)
from omnistage.rpc import LoopThread, error_from_rpc
from omnistage.security import ClientSecurity, aio_channel
from omnistage.stage_client import AsyncStageClient, StageClient, make_request, with_token
from omnistage.types import ChatTurn, PipelineOutput, ProfileReport, SamplingOptions
from omnistage.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

__all__ = [
    "AsyncClient",
    "AsyncStageClient",
    "Client",
    "ClientSecurity",
    "StageClient",
    "make_request",
]

STOP_TIMEOUT_S = 900.0  # stopping profiles waits for every stage's flush and the file pulls


def _sampling(options: Mapping[str, Any] | SamplingOptions | None) -> SamplingOptions:
    if options is None:
        return SamplingOptions()
    if isinstance(options, SamplingOptions):
        return options
    values = dict(options)
    if "stop" in values:
        values["stop"] = tuple(values["stop"] or ())
    return SamplingOptions(**values)


class AsyncClient:
    """Talks to an orchestrator with grpc.aio; `security` sets TLS, mTLS and the token
    (`token=` alone is the shorthand for a token over plaintext)."""

    def __init__(
        self,
        address: str = "localhost:50050",
        *,
        security: ClientSecurity | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.security = with_token(security, token)
        self._channel = aio_channel(address, self.security)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
        apply to every stage; `stage_sampling` overrides them per stage name.
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
        call = self._stub.Generate(request, timeout=timeout)
        try:
            async for msg in call:
                yield pipeline_output_from_pb(msg)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, address=self.address) from exc
        finally:
            call.cancel()

    async def start_profile(
        self,
        stages: Sequence[str | int] | None = None,
        *,
        label: str = "",
        delay_iterations: int = 0,
        max_iterations: int = 0,
    ) -> str:
        """Profile the given stages (names or indices; None means all). Returns the session id."""
        request = orchestrator_pb2.PipelineStartProfileRequest(
            stages=[str(s) for s in stages or ()],
            label=label,
            delay_iterations=delay_iterations,
            max_iterations=max_iterations,
        )
        try:
            reply = await self._stub.StartProfile(request, timeout=300)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, address=self.address) from exc
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
    ) -> ProfileReport:
        """Stop profiling; every stage's files land in `<output_dir>/<session>/<stage>/`,
        with `timeline.json.gz` (all stages on one clock) and `summary.md` beside them.

        `output_dir` is on the orchestrator's side; empty means the pipeline's profile_dir.
        `slim` also writes slimmed copies of the traces (vLLM's idle loops and, with
        `slim_min_duration_us`, short Python frames dropped) and builds the timeline from them.
        """
        request = orchestrator_pb2.PipelineStopProfileRequest(
            stages=[str(s) for s in stages or ()],
            output_dir=output_dir,
            slim=slim,
            slim_min_duration_us=slim_min_duration_us,
            slim_patterns=list(slim_patterns),
        )
        try:
            reply = await self._stub.StopProfile(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, address=self.address) from exc
        return report_from_pb(reply)

    async def pipeline(self) -> orchestrator_pb2.PipelineInfo:
        """Every stage's addresses, health and profiling state."""
        try:
            reply = await self._stub.GetPipeline(orchestrator_pb2.GetPipelineRequest(), timeout=30)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, address=self.address) from exc
        assert isinstance(reply, orchestrator_pb2.PipelineInfo)
        return reply


class Client:
    """The synchronous face of `AsyncClient`."""

    def __init__(
        self,
        address: str = "localhost:50050",
        *,
        security: ClientSecurity | None = None,
        token: str | None = None,
    ) -> None:
        security = with_token(security, token)  # checks the files before a thread starts
        self._loop = LoopThread()
        self._async = self._loop.run(_make(address, security))
        self.address = address

    def generate(self, prompt: str = "", **kwargs: Any) -> Iterator[PipelineOutput]:
        return self._loop.iterate(self._async.generate(prompt, **kwargs))

    def start_profile(self, stages: Sequence[str | int] | None = None, **kwargs: Any) -> str:
        return self._loop.run(self._async.start_profile(stages, **kwargs))

    def stop_profile(self, output_dir: str = "", **kwargs: Any) -> ProfileReport:
        return self._loop.run(self._async.stop_profile(output_dir, **kwargs))

    def pipeline(self) -> orchestrator_pb2.PipelineInfo:
        return self._loop.run(self._async.pipeline())

    def close(self) -> None:
        self._loop.run(self._async.close())
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _make(address: str, security: ClientSecurity | None) -> AsyncClient:
    return AsyncClient(address, security=security)
