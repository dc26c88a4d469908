"""A stage's side of the shared-memory hand-off (docs/shared-memory.md).

In: a request's `shared_tensor` handle becomes its tensor, mapped in place. Out: when the
request's `shared_output` names this stage's domain, each run of output tensor chunks that
join along dim 0 is written into one new segment of the caller's (named with its prefix)
and sent as one `shared_tensor` handle. Should the call fail or be cancelled, the segments
it made are unlinked here, since the caller may never have seen their handles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace

from omnistage import shm
from omnistage.convert import delta_to_pb, shared_tensor_from_pb, shared_tensor_to_pb
from omnistage.errors import InvalidRequestError
from omnistage.types import GenerateInput, OutputDelta, TensorData
from omnistage.v1 import common_pb2, stage_pb2

logger = logging.getLogger(__name__)


class StageSharedMemory:
    """Reads handles in, writes handles out, for one stage; `enabled=False` (--no-shm): its
    domain is empty, so no caller hands it a segment."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.domain = shm.local_domain() if enabled else ""

    def input(
        self, request: stage_pb2.GenerateRequest, generate_input: GenerateInput
    ) -> GenerateInput:
        """`generate_input` with the tensor of the request's shared_tensor handle, if any."""
        if not request.HasField("shared_tensor"):
            return generate_input
        if generate_input.tensor is not None:
            raise InvalidRequestError(
                "the request sets both tensor and shared_tensor; send one tensor input"
            )
        ref = shared_tensor_from_pb(request.shared_tensor)
        return replace(generate_input, tensor=shm.read_segment(ref, domain=self.domain))

    def wants_handles(self, request: stage_pb2.GenerateRequest) -> bool:
        """Whether the caller asked for output handles and shares this stage's domain."""
        if not request.HasField("shared_output") or not self.domain:
            return False
        if request.shared_output.domain != self.domain:
            return False
        shm.check_prefix(request.shared_output.name_prefix)
        return True

    async def responses(
        self, request: stage_pb2.GenerateRequest, deltas: AsyncIterator[OutputDelta]
    ) -> AsyncGenerator[tuple[OutputDelta, stage_pb2.GenerateResponse], None]:
        """Each delta with its message; runs of tensor chunks as one handle when asked."""
        if not self.wants_handles(request):
            async for delta in deltas:
                yield delta, delta_to_pb(delta)
            return
        offer = request.shared_output
        made: list[str] = []  # new segments: removed here if the call does not end well
        used: set[str] = set()  # the caller's offered segments written so far
        run: list[OutputDelta] = []
        done = False
        try:
            async for delta in deltas:
                if _joins(run, delta):
                    run.append(delta)
                    continue
                if run:
                    yield await self._flush(run, offer, made, used)
                    run = []
                if _tensor_only(delta) and _big(delta, offer.min_bytes):
                    run.append(delta)
                else:
                    yield delta, delta_to_pb(delta)
            if run:
                yield await self._flush(run, offer, made, used)
            done = True
        finally:
            if not done:
                for name in made:
                    with contextlib.suppress(FileNotFoundError):
                        (shm.SHM_DIR / name).unlink()

    async def _flush(
        self,
        run: list[OutputDelta],
        offer: common_pb2.SharedOutput,
        made: list[str],
        used: set[str],
    ) -> tuple[OutputDelta, stage_pb2.GenerateResponse]:
        chunks = [d.tensor for d in run if d.tensor is not None]
        nbytes = sum(len(c.data) for c in chunks)
        reuse = next(
            (g.name for g in offer.segments if g.capacity >= nbytes and g.name not in used), ""
        )
        used.add(reuse)
        loop = asyncio.get_running_loop()
        writing = loop.run_in_executor(
            None,
            lambda: shm.write_segment(offer.name_prefix, chunks, domain=self.domain, reuse=reuse),
        )
        try:
            ref = await asyncio.shield(writing)
        except shm.SharedMemoryFullError as exc:
            logger.warning("%s: sending %d tensor chunks as bytes", exc, len(chunks))
            return _as_bytes(run)
        except asyncio.CancelledError:
            if not reuse:
                writing.add_done_callback(_unlink_written)
            raise
        if ref.name != reuse:
            made.append(ref.name)
        delta = replace(run[0], tensor=TensorData(ref.dtype, ref.shape, b"", shared=ref))
        message = stage_pb2.GenerateResponse(request_id=delta.request_id)
        message.shared_tensor.CopyFrom(shared_tensor_to_pb(ref))
        return delta, message


def _as_bytes(run: list[OutputDelta]) -> tuple[OutputDelta, stage_pb2.GenerateResponse]:
    """A run that could not go into shared memory, joined into one message of bytes."""
    chunks = [d.tensor for d in run if d.tensor is not None]
    from omnistage.tensors import join_tensors

    joined = chunks[0] if len(chunks) == 1 else join_tensors(chunks)
    delta = replace(run[0], tensor=joined)
    return delta, delta_to_pb(delta)


def _unlink_written(future: asyncio.Future[shm.SharedTensorRef]) -> None:
    """A segment written for a call that was cancelled meanwhile: nobody will read it."""
    if not future.cancelled() and future.exception() is None:
        with contextlib.suppress(FileNotFoundError):
            (shm.SHM_DIR / future.result().name).unlink()


def _tensor_only(delta: OutputDelta) -> bool:
    return (
        delta.tensor is not None
        and not delta.finished
        and not delta.text
        and not delta.token_ids
        and len(delta.tensor.shape) > 0
    )


def _big(delta: OutputDelta, min_bytes: int) -> bool:
    return delta.tensor is not None and len(delta.tensor.data) >= min_bytes


def _joins(run: list[OutputDelta], delta: OutputDelta) -> bool:
    """Whether `delta` continues the run: a tensor chunk of the same dtype and shape[1:]."""
    if not run or not _tensor_only(delta):
        return False
    first, tensor = run[0].tensor, delta.tensor
    assert first is not None and tensor is not None
    return tensor.dtype == first.dtype and tensor.shape[1:] == first.shape[1:]
