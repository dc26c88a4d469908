"""Python clients. The asyncio client is the implementation; the sync client wraps it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnistage.client_base import AsyncRpcClient, SyncRpcClient
from omnistage.convert import (
    delta_from_pb,
    generate_input_to_pb,
    manifest_from_pb,
    sampling_to_pb,
    shared_tensor_from_pb,
    shared_tensor_to_pb,
    stage_description_from_pb,
)
from omnistage.errors import InvalidRequestError, StageUnavailableError
from omnistage.rpc import STOP_PROFILE_TIMEOUT_S
from omnistage.shm_session import SharedMemorySession
from omnistage.trace_context import outgoing_metadata
from omnistage.types import (
    ChatTurn,
    GenerateInput,
    OutputDelta,
    ProfileManifest,
    SamplingOptions,
    StageDescription,
)
from omnistage.v1 import stage_pb2, stage_pb2_grpc

T = TypeVar("T")


def make_request(
    *,
    prompt: str = "",
    messages: list[dict[str, str]] | list[ChatTurn] | None = None,
    token_ids: list[int] | None = None,
    request_id: str = "",
    **sampling: Any,
) -> GenerateInput:
    turns = tuple(m if isinstance(m, ChatTurn) else ChatTurn(**m) for m in (messages or []))
    if "stop" in sampling:
        sampling["stop"] = tuple(sampling["stop"] or ())
    return GenerateInput(
        request_id=request_id,
        prompt=prompt,
        token_ids=tuple(token_ids or ()),
        messages=turns,
        sampling=SamplingOptions(**sampling),
    )


def _request_to_pb(
    request: GenerateInput, shared: SharedMemorySession | None
) -> stage_pb2.GenerateRequest:
    """The request; its tensor as a handle when it lies in `shared`'s domain already."""
    tensor = request.tensor
    ref = tensor.shared if tensor is not None else None
    if shared is None or ref is None or ref.domain != shared.domain:
        return generate_input_to_pb(request)
    message = generate_input_to_pb(replace(request, tensor=None))
    message.shared_tensor.CopyFrom(shared_tensor_to_pb(ref))
    return message


class AsyncStageClient(AsyncRpcClient):
    """Talks to one stage service with grpc.aio; `security` sets TLS, mTLS and the token."""

    def _connected(self, channel: grpc.aio.Channel) -> None:
        self._stub = stage_pb2_grpc.StageStub(channel)
        self._shm_domain: str | None = None  # the stage's, from GetInfo once it is needed

    async def health(self, *, timeout: float = 2.0) -> str:
        """SERVING or NOT_SERVING, or the status code's name when the check itself fails."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            return str(code.name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def generate(
        self,
        request: GenerateInput,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        shared: SharedMemorySession | None = None,
        shared_output: bool = False,
    ) -> AsyncIterator[OutputDelta]:
        """Stream the stage's deltas; `metadata` goes with the call (a `traceparent`), and
        without it the current OpenTelemetry span's context, when one is current.

        With `shared` (a request's shared-memory session) and a stage in the same domain, a
        tensor already in one of its segments goes as a handle, and with `shared_output`
        the stage sends its output tensors as handles too (docs/shared-memory.md)."""
        sent = tuple(metadata) or outgoing_metadata()
        same_host = shared is not None and await self._shares_domain(shared.domain)
        message = _request_to_pb(request, shared if same_host else None)
        if same_host and shared is not None and shared_output:
            message.shared_output.domain = shared.domain
            message.shared_output.name_prefix = shared.prefix
            message.shared_output.min_bytes = shared.min_bytes
            for name, capacity in shared.offer():
                message.shared_output.segments.add(name=name, capacity=capacity)
        call = self._stub.Generate(message, timeout=timeout, metadata=sent or None)
        try:
            with self._errors(call):
                async for msg in call:
                    delta = delta_from_pb(msg)
                    if msg.HasField("shared_tensor") and shared is not None:
                        ref = shared_tensor_from_pb(msg.shared_tensor)
                        delta = replace(delta, tensor=shared.receive(ref))
                    yield delta
        except StageUnavailableError:
            self._shm_domain = None  # a stage that comes back may run elsewhere
            raise

    async def _shares_domain(self, domain: str) -> bool:
        if not domain:
            return False
        if self._shm_domain is None:
            self._shm_domain = (await self.info()).shm_domain
        return self._shm_domain == domain

    async def start_profile(
        self, *, label: str = "", delay_iterations: int = 0, max_iterations: int = 0
    ) -> str:
        request = stage_pb2.StartProfileRequest(
            label=label, delay_iterations=delay_iterations, max_iterations=max_iterations
        )
        reply = await self._call(self._stub.StartProfile(request, timeout=120))
        return str(reply.session_id)

    async def stop_profile(self, *, timeout: float = STOP_PROFILE_TIMEOUT_S) -> ProfileManifest:
        reply = await self._call(
            self._stub.StopProfile(stage_pb2.StopProfileRequest(), timeout=timeout)
        )
        return manifest_from_pb(reply)

    async def fetch_file(
        self,
        session_id: str,
        name: str,
        dest: Path,
        *,
        offset: int = 0,
        on_bytes: Callable[[int], None] | None = None,
    ) -> int:
        """Stream one session file into `dest`; return the bytes written by this call.

        With `offset` > 0 the download resumes: `dest` must already hold the file's first
        `offset` bytes; whatever lies past them is replaced. `on_bytes` is called with each
        chunk's byte count once it is written (for progress). When the RPC, the disk or
        `on_bytes` fails, a file this call created (offset 0) is deleted; a resumed one is
        kept, cut where the last chunk ended, so it can be resumed again.
        """
        if offset < 0:
            raise InvalidRequestError(f"offset must be ≥ 0 (got {offset})")
        if offset > 0:
            held = dest.stat().st_size if dest.is_file() else None
            if held is None or held < offset:
                has = "does not exist" if held is None else f"holds only {held} bytes"
                raise InvalidRequestError(
                    f"cannot resume {dest} at offset {offset}: it {has}; resume at most from "
                    "the bytes it holds, or fetch from offset 0"
                )
        request = stage_pb2.FetchProfileFileRequest(session_id=session_id, name=name, offset=offset)
        dest.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        call = self._stub.FetchProfileFile(request, timeout=600)
        try:
            # cancelled on the way out: a write that failed mid-stream stops the stage sending
            with self._errors(call), dest.open("r+b" if offset else "wb") as handle:
                if offset:
                    handle.truncate(offset)
                async for chunk in call:
                    handle.seek(chunk.offset)
                    handle.write(chunk.data)
                    written += len(chunk.data)
                    if on_bytes is not None:
                        on_bytes(len(chunk.data))
        except BaseException:
            if not offset:
                dest.unlink(missing_ok=True)  # a disk that filled up leaves no half-written file
            raise
        return written

    async def validate_sampling(self, options: SamplingOptions, *, timeout: float = 5.0) -> None:
        """Return when the stage's engine would accept `options` (ValidateSampling); raise
        `InvalidRequestError` naming the field when it would not. Nothing runs."""
        request = stage_pb2.ValidateSamplingRequest(sampling=sampling_to_pb(options))
        await self._call(self._stub.ValidateSampling(request, timeout=timeout))

    async def info(self, *, timeout: float = 10.0) -> StageDescription:
        """The stage's engine, model, profiling state and wall clock (GetInfo)."""
        request = stage_pb2.GetInfoRequest()
        reply = await self._call(self._stub.GetInfo(request, timeout=timeout))
        return stage_description_from_pb(reply)


class StageClient(SyncRpcClient[AsyncStageClient]):
    """The synchronous face of `AsyncStageClient`, for scripts and notebooks."""

    async_class = AsyncStageClient

    def generate(
        self, request: GenerateInput, *, timeout: float | None = None
    ) -> Iterator[OutputDelta]:
        return self._loop.iterate(self._async.generate(request, timeout=timeout))

    def start_profile(self, **options: Any) -> str:
        return self._loop.run(self._async.start_profile(**options))

    def stop_profile(self, **options: Any) -> ProfileManifest:
        return self._loop.run(self._async.stop_profile(**options))

    def fetch_file(self, session_id: str, name: str, dest: Path, **options: Any) -> int:
        """See `AsyncStageClient.fetch_file`; `on_bytes` runs on the client's loop thread."""
        return self._loop.run(self._async.fetch_file(session_id, name, dest, **options))

    def validate_sampling(self, options: SamplingOptions) -> None:
        self._loop.run(self._async.validate_sampling(options))

    def info(self) -> StageDescription:
        return self._loop.run(self._async.info())
