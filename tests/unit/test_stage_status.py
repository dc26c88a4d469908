"""A stage's status code reaches the orchestrator's client unchanged, the stage named."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest

from omnistage.errors import OmnistageError
from omnistage.rpc import error_from_rpc
from omnistage.server.errors import status_code
from omnistage.types import GenerateInput, OutputDelta, SamplingOptions
from orchestrator.config import parse_pipeline
from orchestrator.runner import PipelineRunner
from tests.unit.fake_grpc import Aborted, FakeContext, FakeRpcError, mapped
from tests.unit.fake_stages import FakePool


@dataclass
class FailingStage:
    """Yields `tokens` deltas, then fails as a stage answering `code` would."""

    code: grpc.StatusCode | None = None
    tokens: int = 3
    closed: list[bool] = field(default_factory=list)

    async def validate_sampling(self, options: SamplingOptions, *, timeout: float = 5.0) -> None:
        pass  # its sampling is fine: it fails mid-stream

    async def generate(
        self,
        request: GenerateInput,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        shared: object = None,  # a request's shared-memory session: fakes share no domain
        shared_output: bool = False,
    ) -> AsyncIterator[OutputDelta]:
        try:
            for token in range(self.tokens):
                await asyncio.sleep(0)  # yields to the loop between deltas, as a stream does
                yield OutputDelta(request.request_id, token_ids=(token,), text=f"{token} ")
            if self.code is not None:
                raise error_from_rpc(FakeRpcError(self.code, "the stage said no"), address="h:2")
            yield OutputDelta(request.request_id, finished=True, finish_reason="stop")
        finally:
            self.closed.append(True)


UNMAPPED_AND_MAPPED = [
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAVAILABLE,
]


@pytest.mark.parametrize("code", UNMAPPED_AND_MAPPED)
def test_stage_failing_mid_stream_keeps_its_status(code: grpc.StatusCode) -> None:
    pipeline = parse_pipeline(
        "stages:\n"
        "  - {name: thinker, address: fake:1}\n"
        "  - {name: talker, address: fake:2}\n"
        "  - {name: code2wav, address: fake:3}\n"
    )
    pool = FakePool(thinker=FailingStage(), talker=FailingStage(code), code2wav=FailingStage())
    runner = PipelineRunner(pipeline, pool)  # type: ignore[arg-type]
    context = FakeContext()
    seen: list[str] = []

    async def serve() -> None:
        async for event in runner.run(GenerateInput(request_id="r1", prompt="hi")):
            seen.append(event.stage)

    with pytest.raises(Aborted):
        asyncio.run(mapped(context, "Generate", serve()))
    assert context.status is not None
    status, message = context.status
    assert status is code
    assert message.startswith("stage 'talker': ") and "the stage said no" in message
    assert "h:2" in message
    # The talker had streamed before it failed; the code2wav stage was never called.
    assert seen.count("talker") == 3 and "code2wav" not in seen
    assert pool.stages["talker"].closed == [True] and not pool.stages["code2wav"].closed


def test_status_code_prefers_the_remote_code() -> None:
    error = error_from_rpc(FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "no"))
    assert status_code(error) is grpc.StatusCode.PERMISSION_DENIED
    assert type(error) is OmnistageError  # no error class stands for it
    assert error.code == "PERMISSION_DENIED"  # the instance keeps the code
